"""Phantom tissue labels and their nominal HU (without / with IV contrast)."""

from __future__ import annotations

import enum

PHANTOM_VERSION = 1
#: smallest grid that still resolves the anatomy meaningfully
MIN_SIZE = 16
#: HU clip range of generated volumes (the range of real CT data in this project)
HU_MIN, HU_MAX = -1024.0, 3071.0


class Label(enum.IntEnum):
    """Tissue label of each voxel (``labels`` array of :func:`make_phantom`).

    Nominal HU (without / with IV contrast) are in :data:`NOMINAL_HU`.
    """

    AIR = 0  #: outside the body
    FAT = 1  #: subcutaneous, mediastinal, epicardial, perirenal and mesenteric fat
    SOFT_TISSUE = 2  #: muscle, body wall, diaphragm, oesophagus, airway walls, neck
    LUNG = 3  #: aerated lung parenchyma
    LUNG_VESSEL = 4  #: pulmonary vessels (voxels whose centre is mostly vessel)
    AIRWAY = 5  #: air in the trachea and bronchi
    MYOCARDIUM = 6  #: heart muscle
    BLOOD_POOL = 7  #: blood in the heart chambers
    AORTA = 8  #: aorta (ascending, arch, descending)
    LIVER = 9
    SPLEEN = 10
    STOMACH = 11  #: stomach wall and fluid content
    GAS = 12  #: gas in the stomach
    KIDNEY = 13
    BOWEL = 14  #: abdominal soft tissue (bowel loops)
    VERTEBRA = 15  #: trabecular bone of the vertebral bodies
    CORTICAL_BONE = 16  #: vertebral cortex and posterior vertebral elements
    DISC = 17  #: intervertebral discs
    SPINAL_CANAL = 18  #: spinal canal (cord + CSF)
    RIB = 19
    COSTAL_CARTILAGE = 20
    STERNUM = 21
    CLAVICLE = 22
    SCAPULA = 23
    VESSEL = 24  #: other mediastinal vessels: aortic-arch branches, superior vena cava


#: nominal HU per label: (no contrast, IV contrast). Per-patient values jitter around these.
NOMINAL_HU: dict[Label, tuple[float, float]] = {
    Label.AIR: (-1000.0, -1000.0),
    Label.FAT: (-100.0, -100.0),
    Label.SOFT_TISSUE: (40.0, 50.0),
    Label.LUNG: (-850.0, -850.0),
    Label.LUNG_VESSEL: (40.0, 250.0),
    Label.AIRWAY: (-1000.0, -1000.0),
    Label.MYOCARDIUM: (40.0, 100.0),
    Label.BLOOD_POOL: (40.0, 275.0),
    Label.AORTA: (40.0, 300.0),
    Label.LIVER: (60.0, 100.0),
    Label.SPLEEN: (45.0, 120.0),
    Label.STOMACH: (20.0, 30.0),
    Label.GAS: (-1000.0, -1000.0),
    Label.KIDNEY: (30.0, 170.0),
    Label.BOWEL: (30.0, 60.0),
    Label.VERTEBRA: (200.0, 200.0),
    Label.CORTICAL_BONE: (400.0, 400.0),
    Label.DISC: (80.0, 80.0),
    Label.SPINAL_CANAL: (15.0, 15.0),
    Label.RIB: (700.0, 700.0),
    Label.COSTAL_CARTILAGE: (150.0, 150.0),
    Label.STERNUM: (350.0, 350.0),
    Label.CLAVICLE: (650.0, 650.0),
    Label.SCAPULA: (500.0, 500.0),
    Label.VESSEL: (40.0, 280.0),
}




"""The MLflow server's database login of infra/k8s/mlflow.yaml, against a real PostgreSQL.

The manifest's backend-store URI names host, port and database only; libpq (psycopg2, under
SQLAlchemy and MLflow's store) takes the user and the password from the service file of
Secret xct-mlflow-db (``PGSERVICEFILE``, service ``PGSERVICE``). Here that URI — pointed at a
throw-away PostgreSQL on 127.0.0.1 — logs in as the role the service file names, MLflow's own
SQLAlchemy store creates its schema through it, and without the service file the same URI is
refused: the password really comes from the file, never from the command line.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from postgres_server import postgres  # noqa: F401 - the fixture

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "infra" / "k8s"


def _object(file: str, kind: str, name: str) -> dict:
    return next(d for d in yaml.safe_load_all((K8S / file).read_text())
                if d and d["kind"] == kind and d["metadata"]["name"] == name)


def test_the_manifests_backend_uri_logs_in_through_the_service_file(postgres, tmp_path: Path,  # noqa: F811
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import sqlalchemy

    c = _object("mlflow.yaml", "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
    uri = c["args"][c["args"].index("--backend-store-uri") + 1]
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    template = _object("secrets.template.yaml", "Secret", "xct-mlflow-db")["stringData"]["pg_service.conf"]
    service_file = tmp_path / "pg_service.conf"
    service_file.write_text(template.replace("CHANGE_ME_POSTGRES_USER", postgres.user)
                            .replace("CHANGE_ME_POSTGRES_PASSWORD", postgres.password))
    manifest = urlparse(uri)
    local = uri.replace(manifest.netloc, f"127.0.0.1:{postgres.port}")
    assert urlparse(local).username is None and postgres.password not in local
    for var in ("PGPASSWORD", "PGUSER", "PGPASSFILE", "PGSERVICE", "PGSERVICEFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.pgpass or ~/.pg_service.conf of this machine

    # without the service file: refused (nobody's password is in the URI)
    engine = sqlalchemy.create_engine(local, poolclass=sqlalchemy.pool.NullPool)
    with pytest.raises(sqlalchemy.exc.OperationalError):
        with engine.connect():
            pass

    # with the manifest's PGSERVICEFILE / PGSERVICE settings: in, as the service file's role
    monkeypatch.setenv("PGSERVICEFILE", str(service_file))
    monkeypatch.setenv("PGSERVICE", env["PGSERVICE"])
    assert env["PGSERVICEFILE"].endswith("/pg_service.conf")
    with engine.connect() as conn:
        assert conn.execute(sqlalchemy.text("select current_user")).scalar() == postgres.user
        assert conn.execute(sqlalchemy.text("select current_database()")).scalar() == manifest.path.lstrip("/")
    # what `mlflow server --backend-store-uri URI` builds: its store, schema migrations included
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    store = SqlAlchemyStore(local, str(tmp_path / "artifacts"))
    exp = store.create_experiment("k8s-pg-service")
    assert store.get_experiment(exp).name == "k8s-pg-service"

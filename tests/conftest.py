"""Shared fixtures: tiny checkpoints built in-process (never downloaded)."""

from __future__ import annotations

import os
import shutil

import pytest
from sqlalchemy import make_url

from tests.pg import BACKENDS, PG_ENV, pg_test_url, temporary_pg_database

# Tests never reach a model hub; loading code must work from local folders alone.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The CLI turns the libraries' progress bars off before they are imported; in-process CLI tests
# run after other tests imported transformers, so set it here too, before any test imports it
# (test_check_cli checks the real command without it, in a subprocess).
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _env_in_tmp(tmp_path_factory, variable: str, name: str):
    """Point `variable` at a new temporary folder for the session, then restore it."""
    previous = os.environ.get(variable)
    os.environ[variable] = str(tmp_path_factory.mktemp(name))
    yield
    if previous is None:
        os.environ.pop(variable, None)
    else:
        os.environ[variable] = previous


@pytest.fixture(autouse=True, scope="session")
def _prompt_cache_in_tmp(tmp_path_factory):
    """Keep the prompt-embedding cache out of the user's ~/.cache during tests."""
    yield from _env_in_tmp(tmp_path_factory, "MODERATION_CACHE_DIR", "prompt-cache")


@pytest.fixture(autouse=True, scope="session")
def _embedding_cache_in_tmp(tmp_path_factory):
    """Keep calibrate's image-embedding cache out of the user's ~/.cache during tests."""
    yield from _env_in_tmp(tmp_path_factory, "MODERATION_EMBEDDING_CACHE_DIR", "image-cache")


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A tiny CLIP checkpoint (both towers, tokenizer, image processor) saved with save_pretrained."""
    from moderation.synthetic import make_tiny_clip

    return make_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def encoder(tiny_clip_dir):
    """The tiny CLIP checkpoint loaded once on the CPU, for every test that embeds with it."""
    from moderation.encoder import ClipEncoder

    return ClipEncoder.from_pretrained(tiny_clip_dir, device="cpu")


@pytest.fixture(scope="session")
def tiny_checker_dir(tmp_path_factory):
    """A tiny StableDiffusionSafetyChecker checkpoint (17 + 3 concepts) in the current key layout."""
    from moderation.synthetic import make_safety_checker

    return make_safety_checker(tmp_path_factory.mktemp("tiny-checker"))


@pytest.fixture(autouse=True, scope="session")
def _user_data_in_tmp(tmp_path_factory):
    """Keep held originals' per-user default folder (platformdirs) out of the user's home."""
    previous = os.environ.get("XDG_DATA_HOME")
    os.environ["XDG_DATA_HOME"] = str(tmp_path_factory.mktemp("user-data"))
    yield
    if previous is None:
        os.environ.pop("XDG_DATA_HOME", None)
    else:
        os.environ["XDG_DATA_HOME"] = previous


# --- databases: one fixture for every test that needs an empty, migrated log -----------------


@pytest.fixture(scope="session")
def pg_server() -> str:
    """The PostgreSQL server of the tests (MODERATION_TEST_PG_URL); skips where it is unset."""
    url = pg_test_url()
    if url is None:
        pytest.skip(f"{PG_ENV} is not set")
    return url


@pytest.fixture(scope="session")
def _pg_session_database(pg_server):
    """One migrated PostgreSQL database for the whole run, emptied before each test that uses
    it (creating and migrating one per test costs about a second)."""
    from moderation.storage import upgrade

    with temporary_pg_database(pg_server, "moderation_tests") as url:
        upgrade(url)
        yield url


@pytest.fixture(scope="session")
def _sqlite_template(tmp_path_factory):
    """A migrated SQLite file, copied for each test (cheaper than migrating each time)."""
    from moderation.storage import db, upgrade

    url = f"sqlite:///{tmp_path_factory.mktemp('db-template')}/template.db"
    upgrade(url)
    db.dispose(url)
    return make_url(url).database


def empty_pg(url: str) -> None:
    """Every table of the log emptied and its ids restarted, as in a new database."""
    from sqlalchemy import inspect

    from moderation.storage import db

    engine = db.engine_for(url)
    tables = [t for t in inspect(engine).get_table_names() if t != "alembic_version"]
    with engine.begin() as conn:
        names = ", ".join(f'"{t}"' for t in tables)
        conn.exec_driver_sql(f"TRUNCATE {names} RESTART IDENTITY CASCADE")


@pytest.fixture(scope="module", params=BACKENDS)
def module_db_url(request, tmp_path_factory):
    """An empty, migrated log database for one module's tests to share (a log seeded once),
    on SQLite and on PostgreSQL (a database of its own, dropped after the module)."""
    from moderation.storage import db, upgrade

    if request.param == "sqlite":
        path = tmp_path_factory.mktemp("module-db") / "moderation.db"
        shutil.copyfile(request.getfixturevalue("_sqlite_template"), path)
        url = f"sqlite:///{path}"
        yield url
        db.dispose(url)
        return
    with temporary_pg_database(request.getfixturevalue("pg_server"), "moderation_module") as url:
        upgrade(url)
        yield url


@pytest.fixture(params=BACKENDS)
def db_url(request, tmp_path):
    """An empty, migrated log database for one test, on SQLite and on PostgreSQL (skipped only
    where MODERATION_TEST_PG_URL is unset)."""
    from moderation.storage import db

    if request.param == "sqlite":
        path = tmp_path / "moderation.db"
        shutil.copyfile(request.getfixturevalue("_sqlite_template"), path)
        url = f"sqlite:///{path}"
        yield url
        db.dispose(url)
        return
    yield request.getfixturevalue("pg_url")


@pytest.fixture
def pg_url(_pg_session_database):
    """An empty, migrated PostgreSQL log database for one test (skipped where
    MODERATION_TEST_PG_URL is unset)."""
    empty_pg(_pg_session_database)
    return _pg_session_database


@pytest.fixture(params=BACKENDS)
def outage(request, tmp_path):
    """(URL of a database that is unreachable now, a function that brings it up), per backend."""
    from moderation.storage import db
    from tests.pg import pg_database_later

    if request.param == "sqlite":
        folder = tmp_path / "later"
        url = f"sqlite:///{folder / 'log.db'}"
        yield url, folder.mkdir
        db.dispose(url)
        return
    with pg_database_later(request.getfixturevalue("pg_server")) as (url, create):
        yield url, create

"""``pgstreams.testing``: the fixtures users import give each test module its own database."""

from __future__ import annotations

import psycopg
import pytest

import pgstreams as ps
import pgstreams.testing as pst


def test_fixtures_give_each_module_a_fresh_database_and_drop_it(
    pytester: pytest.Pytester, pg_admin_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(pst.TEST_DSN_ENV, pg_admin_dsn)
    pytester.makeconftest('pytest_plugins = ["pgstreams.testing.fixtures"]\n')
    module = """
import psycopg

def test_own_database(pg_database, pg_server):
    with psycopg.connect(pg_database) as conn:
        name = conn.execute("SELECT current_database()").fetchone()[0]
        conn.execute("CREATE TABLE mine (x int)")  # would clash if the database were shared
    assert name.startswith("pgs_{label}_")
    print("DB=" + name)
"""
    pytester.makepyfile(test_one=module.format(label="test_one"))
    pytester.makepyfile(test_two=module.format(label="test_two"))
    result = pytester.runpytest_subprocess("-s", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    names = [
        line.split("DB=", 1)[1].split()[0].rstrip(".") for line in result.outlines if "DB=" in line
    ]
    assert len(set(names)) == 2
    with psycopg.connect(pg_admin_dsn, autocommit=True) as conn:
        left = conn.execute(
            "SELECT datname FROM pg_database WHERE datname = ANY(%s)", [names]
        ).fetchall()
    assert left == []


def test_fresh_database_drops_slots_left_on_it(pg_admin_dsn: str) -> None:
    with pst.fresh_database(pg_admin_dsn, "slots") as dsn, psycopg.connect(dsn) as conn:
        if conn.execute("SHOW wal_level").fetchone() != ("logical",):
            pytest.skip("the server has no logical decoding (wal_level is not logical)")
        conn.execute("SELECT pg_create_logical_replication_slot('pgs_testing_slot', 'pgoutput')")
        conn.commit()
    with psycopg.connect(pg_admin_dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'pgs_testing_slot'"
        ).fetchone()
    assert row == (0,)


def test_embedded_is_an_unstarted_server_until_entered() -> None:
    server = pst.embedded()
    with pytest.raises(ps.EmbeddedPostgresError, match="not running"):
        _ = server.dsn

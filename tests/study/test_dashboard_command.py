"""`qstudy dashboard STUDY`: optuna-dashboard on the study's own Optuna storage, reachable from this machine only."""

from __future__ import annotations

import json

import optuna_dashboard
from qstudy.cli import main


def test_dashboard_serves_the_studys_storage_on_localhost(tmp_path, monkeypatch, capsys):
    storage = f"sqlite:///{tmp_path / 'studies' / 'mine' / 'optuna.db'}"
    (tmp_path / "studies" / "mine").mkdir(parents=True)
    (tmp_path / "studies" / "mine" / "study.json").write_text(json.dumps({
        "name": "mine", "space_origin": "space.yaml", "tracking_uri": "sqlite:///x.db", "experiment_id": "1",
        "parent_run_id": "r", "optuna_storage": storage, "force_trainer": False}))
    monkeypatch.setenv("QSTUDY_HOME", str(tmp_path))
    served = []
    monkeypatch.setattr(optuna_dashboard, "run_server", lambda *args, **kwargs: served.append((args, kwargs)))
    assert main(["dashboard", "mine", "--port", "8123"]) == 0
    assert served == [((storage,), {"host": "127.0.0.1", "port": 8123})]
    assert "http://127.0.0.1:8123" in capsys.readouterr().out


def test_an_unknown_study_names_the_known_ones(tmp_path, monkeypatch, capsys):
    (tmp_path / "studies" / "mine").mkdir(parents=True)
    (tmp_path / "studies" / "mine" / "study.json").write_text("{}")
    monkeypatch.setenv("QSTUDY_HOME", str(tmp_path))
    assert main(["dashboard", "other"]) == 2
    err = capsys.readouterr().err
    assert "no study 'other'" in err and "(studies there: mine)" in err

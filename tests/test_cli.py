import json
import subprocess
import sys

from muddformer.cli import main


def test_info_preset_prints_counts(capsys):
    assert main(["info", "muddformer-2.8b"]) == 0
    out = capsys.readouterr().out
    assert "2,804,871,709" in out and "8,775,709" in out and "(0.313 % of total)" in out


def test_info_json_of_a_published_folder(fixtures_dir, capsys):
    assert main(["info", str(fixtures_dir / "mp_tiny"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["config"]["block"] == "pythia" and info["config"]["n_layer"] == 3
    assert info["parameters"]["total"] == 197_400
    assert info["parameters"]["dense"] == 13_848


def test_info_of_a_config_file(tmp_path, capsys):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"n_layer": 2, "dim": 64, "n_head": 2, "vocab_size": 100, "connection": "denseformer"}))
    assert main(["info", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["parameters"]["dense"] == 2 + 3


def test_bad_input_gives_one_line_and_exit_2(tmp_path, run_cli):
    # In this process; the subprocess form (`python -m muddformer info no-such-preset`) is checked below.
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"dim": 100, "n_head": 3}))
    for arg in ("no-such-preset", str(bad)):
        proc = run_cli("info", arg)
        assert proc.returncode == 2
        assert proc.stderr.startswith("mudd: error: ") and proc.stderr.count("\n") == 1
        assert "Traceback" not in proc.stderr


def test_convert_round_trip(fixtures_dir, tmp_path, capsys):
    ours, published = tmp_path / "ours", tmp_path / "published"
    assert main(["convert", str(fixtures_dir / "mf_tiny"), str(ours), "--dtype", "float32"]) == 0
    assert json.loads((ours / "config.json").read_text())["torch_dtype"] == "float32"
    assert main(["convert", str(ours), str(published), "--published-format"]) == 0
    assert json.loads((published / "config.json").read_text()) == json.loads(
        (fixtures_dir / "mf_tiny" / "config.json").read_text()
    )
    assert main(["presets"]) == 0
    assert "muddpythia-1.4b" in capsys.readouterr().out


def test_python_dash_m_muddformer_is_the_mudd_command():
    """`python -m muddformer` (what `torchrun -m muddformer train` runs) dispatches like `mudd`: its one-line
    error here; its bench and train runs in test_gpu_check (the GPU check's dry run calls them this way)."""
    proc = subprocess.run(
        [sys.executable, "-m", "muddformer", "info", "no-such-preset"], capture_output=True, text=True
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "no-such-preset" in proc.stderr

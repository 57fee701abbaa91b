"""`genius demo` end to end on a small fake Fashion-MNIST (the real one is a Debian package)."""
import json
import logging

from cluster.cli import main
from tests.genius.data.fakes import fake_fashion_mnist


def test_demo_runs_every_stage_and_writes_its_report(tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO)
    source = tmp_path / "fmnist"
    fake_fashion_mnist(source, n_train=300, n_test=120)
    out = tmp_path / "demo"
    args = ["demo", "--source", str(source), "--out", str(out), "--stage1-steps", "3", "--candidates", "60",
            "--queries", "20", "--beam", "5", "--quantizer-epochs", "1", "--decoder-epochs", "1", "--threads", "1"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "exact kNN" in printed and "GENIUS" in printed
    assert "example text->image queries" in printed and "example image->text queries" in printed
    for name in ("report.json", "report.md", "recall_vs_beam.png", "demo.json", "shards/shards.json",
                 "encoder/encoder_config.json"):
        assert (out / name).exists(), name
    json.loads((out / "report.json").read_text())
    # A second run reuses the shards and the stage-1 encoder.
    caplog.clear()
    assert main(args) == 0
    assert "reusing the stage-1 encoder" in caplog.text
    assert "converting Fashion-MNIST" not in caplog.text

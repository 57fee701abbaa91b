"""`genius demo` end to end on a small fake Fashion-MNIST (the real one is a Debian package):
the in-process evaluation (--mode eval) and the served system (default: Ray build, gRPC)."""
import json
import logging
from pathlib import Path

import grpc
import numpy as np
import pytest

from cluster.cli import main
from tests.genius.data.fakes import fake_fashion_mnist, write_idx

COMBINATIONS = ["text->image", "image->text", "text->image_text", "image->image", "image_text->image"]


def test_demo_runs_every_stage_and_writes_its_report(tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO)
    source = tmp_path / "fmnist"
    fake_fashion_mnist(source, n_train=300, n_test=120)
    out = tmp_path / "demo"
    args = ["demo", "--mode", "eval", "--source", str(source), "--out", str(out), "--stage1-steps", "3",
            "--candidates", "60", "--queries", "20", "--beam", "5", "--quantizer-epochs", "1", "--decoder-epochs", "1",
            "--threads", "1"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "exact kNN" in printed and "GENIUS" in printed
    assert "example text->image queries" in printed and "example image->text queries" in printed
    for name in ("report.json", "report.md", "recall_vs_beam.png", "demo.json", "shards/shards.json",
                 "encoder/encoder_config.json"):
        assert (out / name).exists(), name
    report = json.loads((out / "report.json").read_text())
    assert [t["name"] for t in report["tasks"]] == [f"fashion-mnist/{c}" for c in COMBINATIONS]
    assert report["meta"]["main_beam"] == 5 and report["universal"]["candidates"] == 3 * 60
    # Exact kNN over the stage-1 embeddings (the locked MiniLM text tower), with the universal
    # (instructed) queries, on the task whose candidates carry the caption: far above a random
    # ranking of the pool (chance R@1 ~0.09 here; 1.0 measured).
    task = next(t for t in report["tasks"] if t["name"] == "fashion-mnist/text->image_text")
    knn = next(r for r in report["results"] if r["task"] == task["name"] and r["method"] == "exact kNN"
               and r["pool"] == "task")
    assert knn["recall@1"] > 2 * task["chance_recall@1"] + 0.05, (knn, task["chance_recall@1"])
    # A second run reuses the shards and the stage-1 encoder.
    caplog.clear()
    assert main(args) == 0
    assert "reusing the stage-1 encoder" in caplog.text
    assert "converting Fashion-MNIST" not in caplog.text


def class_patterned_fashion_mnist(folder: Path, n_train: int, n_test: int) -> None:
    """Fashion-MNIST-format files whose images show their class (a bar whose row is the
    label, at a random intensity), so that image queries can beat chance too."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = np.zeros((n, 28, 28), np.uint8)
        for i, label in enumerate(labels):
            images[i, 2 + 2 * label : 5 + 2 * label, 4:24] = rng.integers(120, 255)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)


def answers(address: str) -> bool:
    from genius.client import SearchClient

    try:
        with SearchClient(address, timeout=3.0) as client:
            client.search(text="retrieve an image: a dress", k=1)
        return True
    except grpc.RpcError:
        return False


def test_served_demo_builds_on_ray_serves_over_grpc_and_stops(tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO)
    source = tmp_path / "fmnist"
    class_patterned_fashion_mnist(source, n_train=400, n_test=120)
    out = tmp_path / "demo"
    args = ["demo", "--source", str(source), "--out", str(out), "--stage1-steps", "10", "--candidates", "30",
            "--queries", "20", "--train-records", "100", "--quantizer-epochs", "3", "--decoder-epochs", "3",
            "--actors", "1", "--threads", "1", "--examples", "1"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "recall.json").read_text())
    combinations = ["text->image", "image->text", "text->image_text", "image->image", "image_text->image"]
    # The index was built by the Ray pipeline and published; the servers answered every query.
    job = json.loads((out / "index" / ".build" / "job.json").read_text())
    assert job["stages"]["publish"]["status"] == "done"
    assert {"train:quantizer", "train:decoder", "pairs"} <= set(job["units"])
    assert summary["build"]["items"] == 3 * (30 + 100)
    assert summary["serving"]["versions"] == ["v-0"] and summary["serving"]["partial"] == 0
    rows = {r["combination"]: r for r in summary["recall"]}
    assert list(rows) == combinations
    for name, row in rows.items():
        assert row["queries"] > 0 and row["with_hits"] == row["queries"], name  # every query got hits
        assert f"\n  {name}\n" in printed
    assert "(no hits)" not in printed
    for modality in ("image", "text", "image_text"):
        assert f"({modality})" in printed
    assert "| text->image_text |" in (out / "recall.md").read_text()
    # A tiny corpus, 10 stage-1 steps (the image tower stays near chance: zero-shot ~0.1) and 3
    # epochs: only text->image_text, whose targets carry the caption, is reliably well above chance;
    # the image combinations vary from run to run, so only the mean over all five is checked.
    assert rows["text->image_text"]["recall@1"] > rows["text->image_text"]["chance@1"] + 0.3
    assert np.mean([r["recall@1"] for r in rows.values()]) > np.mean([r["chance@1"] for r in rows.values()])
    # The servers are stopped: neither the replica nor a shard server answers any more.
    assert not answers(summary["serving"]["address"])
    for address in summary["serving"]["shard_addresses"]:
        channel = grpc.insecure_channel(address)
        with pytest.raises(grpc.FutureTimeoutError):
            grpc.channel_ready_future(channel).result(timeout=1.0)
        channel.close()
    # A second run reuses shards, encoder and index (no Ray), and serves again: fewer held-out
    # queries change neither the indexed items nor the training pairs.
    caplog.clear()
    assert main([*args, "--queries", "5"]) == 0
    assert "reusing the index" in caplog.text and "reusing the stage-1 encoder" in caplog.text
    assert "converting Fashion-MNIST" not in caplog.text
    again = json.loads((out / "recall.json").read_text())
    assert again["index_reused"] is True and again["serving"]["versions"] == ["v-0"]
    assert [r["queries"] for r in again["recall"]] == [5] * 5
    assert not answers(again["serving"]["address"])
    _served_page_until_sigterm(args)


def _served_page_until_sigterm(args: list[str]) -> None:
    """`genius demo --serve` (a real process): the servers and the search page stay up, answer a
    search through the page, and stop on SIGTERM."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    demo = subprocess.Popen([sys.executable, "-m", "cluster.cli", *args, "--queries", "5", "--serve", "--ui-port",
                             str(port)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        url = None
        for line in demo.stdout:
            if line.startswith("search page: "):
                url = line.split()[2]
                break
        assert url == f"http://127.0.0.1:{port}/"
        assert "genius" in urllib.request.urlopen(url, timeout=30).read().decode()
        search = urllib.request.Request(url + "api/search", data=json.dumps({"text": "a photo of a sneaker", "k": 3})
                                        .encode(), headers={"Content-Type": "application/json"})
        reply = json.loads(urllib.request.urlopen(search, timeout=60).read())
        assert reply["version"] == "v-0" and len(reply["hits"]) == 3
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(timeout=60) == 0
    finally:
        if demo.poll() is None:
            demo.kill()

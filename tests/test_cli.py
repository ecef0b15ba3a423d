"""The command line: run, resume after SIGKILL, info, demo, progress, errors."""

from __future__ import annotations

import fcntl
import os
import pty
import random
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import numpy as np
import pytest

import allknn
from allknn.cli import checkpoint_path, main
from allknn.datasets import make_clustered
from allknn.writers import load_result

CLI = [sys.executable, "-m", "allknn.cli"]


@pytest.fixture
def embeddings(tmp_path: Path) -> tuple[Path, np.ndarray]:
    X = make_clustered(3000, 24, n_clusters=20, seed=3)
    X[10] = X[20]  # an exact duplicate
    path = tmp_path / "emb.npy"
    np.save(path, X)
    return path, X


def test_run_npz_equals_api(embeddings, tmp_path):
    path, X = embeddings
    out = tmp_path / "out.npz"
    assert main(["run", str(path), "-k", "7", "-o", str(out), "--quiet"]) == 0
    got = load_result(out)
    want = allknn.neighbors(X, 7)
    np.testing.assert_array_equal(got.indices, want.indices)
    np.testing.assert_array_equal(got.similarities, want.similarities)
    assert not checkpoint_path(out).exists()


def test_run_parquet_with_ids_file(embeddings, tmp_path):
    pd = pytest.importorskip("pandas")
    path, X = embeddings
    ids = tmp_path / "ids.txt"
    ids.write_text("".join(f"item-{i}\n" for i in range(X.shape[0])))
    out = tmp_path / "out.parquet"
    assert main(["run", str(path), "-k", "5", "-o", str(out), "--ids", str(ids), "--quiet"]) == 0
    table = pd.read_parquet(out)
    want = allknn.neighbors(X, 5).to_pandas(ids=[f"item-{i}" for i in range(X.shape[0])])
    assert list(table.columns) == ["id", "neighbor_id", "rank", "similarity"]
    np.testing.assert_array_equal(table["neighbor_id"].to_numpy(), want["neighbor_id"].to_numpy())
    np.testing.assert_array_equal(table["similarity"].to_numpy(), want["similarity"].to_numpy())


def test_min_similarity_leaves_out_weak_neighbours(embeddings, tmp_path):
    pd = pytest.importorskip("pandas")
    path, X = embeddings
    out = tmp_path / "out.parquet"
    assert main(["run", str(path), "-k", "5", "-o", str(out), "--min-similarity", "0.9", "--quiet"]) == 0
    table = pd.read_parquet(out)
    full = allknn.neighbors(X, 5).to_pandas()
    assert (table["similarity"] >= 0.9).all()
    assert len(table) == int((full["similarity"] >= 0.9).sum())


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "{missing}", "-k", "5", "-o", "{out}"], "missing.npy"),
        (["run", "{input}", "-k", "5000", "-o", "{out}"], "k=5000 is too large"),
        (["run", "{input}", "-k", "5", "-o", "{tmp}/out.xlsx"],
         "must end in one of .parquet, .npz, .csv, .tsv"),
        (["run", "{input}", "-k", "5", "-o", "{tmp}/nowhere/out.npz"], "does not exist"),
        (["run", "{input}", "-k", "5", "-o", "{out}", "--max-memory", "lots"], "is not a size"),
    ],
)
def test_errors_are_one_line_and_write_nothing(embeddings, tmp_path, capsys, argv, message):
    path, _ = embeddings
    fill = {"missing": str(tmp_path / "missing.npy"), "input": str(path), "out": str(tmp_path / "out.npz"),
            "tmp": str(tmp_path)}
    assert main([a.format(**fill) for a in argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("allknn: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out.npz").exists()


def test_bad_input_file_writes_no_output(tmp_path, capsys):
    bad = tmp_path / "bad.npy"
    X = np.ones((50, 4), dtype=np.float32)
    X[7] = np.nan
    np.save(bad, X)
    out = tmp_path / "out.parquet"
    assert main(["run", str(bad), "-k", "3", "-o", str(out)]) == 1
    assert "NaN or Inf" in capsys.readouterr().err
    assert not out.exists() and not checkpoint_path(out).exists()


def test_existing_checkpoint_needs_resume(embeddings, tmp_path, capsys):
    path, _ = embeddings
    out = tmp_path / "out.npz"
    checkpoint_path(out).write_bytes(b"left over")
    assert main(["run", str(path), "-k", "5", "-o", str(out)]) == 1
    assert "--resume" in capsys.readouterr().err


def test_resume_refuses_other_parameters(embeddings, tmp_path, capsys):
    path, X = embeddings
    out = tmp_path / "out.npz"
    allknn.neighbors(X, 5, checkpoint=checkpoint_path(out), block_rows=1024, max_memory="1GB")
    assert main(["run", str(path), "-k", "6", "-o", str(out), "--resume"]) == 1
    err = capsys.readouterr().err
    assert "different run" in err and "k: checkpoint has 5, this run has 6" in err


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, "the run finished before it wrote a checkpoint"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)


@pytest.mark.slow
def test_killed_run_resumes_to_identical_output(tmp_path):
    """SIGKILL a run at a random point after its first checkpoint, resume, compare bytes."""
    X = make_clustered(80_000, 48, seed=5)
    X[100:110] = X[5]  # duplicates make ties that must resolve the same way
    source = tmp_path / "big.npy"
    np.save(source, X)
    common = ["-k", "10", "--max-memory", "6MB", "--threads", "2", "--quiet", "--checkpoint-every", "0.2"]

    reference = tmp_path / "reference.parquet"
    subprocess.run([*CLI, "run", str(source), "-o", str(reference), *common], check=True)

    out = tmp_path / "resumed.parquet"
    process = subprocess.Popen([*CLI, "run", str(source), "-o", str(out), *common])
    _wait_for(checkpoint_path(out), process)
    time.sleep(random.Random(7).uniform(0.0, 0.5))
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not out.exists()
    assert checkpoint_path(out).exists()

    subprocess.run([*CLI, "run", str(source), "-o", str(out), *common, "--resume"], check=True)
    assert out.read_bytes() == reference.read_bytes()
    assert not checkpoint_path(out).exists()


def _run_in_terminal(argv: list[str], timeout: float = 120.0) -> str:
    """Run the CLI with stderr and stdout on a pseudo-terminal; return what it showed."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    process = subprocess.Popen([*CLI, *argv], stdout=terminal, stderr=terminal, close_fds=True)
    os.close(terminal)
    shown = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([controller], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(controller, 4096)
            except OSError:
                break
            if not chunk:
                break
            shown += chunk
        elif process.poll() is not None:
            break
    process.wait(timeout=10)
    os.close(controller)
    assert process.returncode == 0, shown.decode(errors="replace")
    return shown.decode(errors="replace")


@pytest.mark.slow
def test_progress_bar_in_a_terminal_and_not_with_quiet(tmp_path):
    X = make_clustered(20_000, 32, seed=2)
    source = tmp_path / "x.npy"
    np.save(source, X)
    shown = _run_in_terminal(["run", str(source), "-k", "5", "-o", str(tmp_path / "a.npz"),
                              "--max-memory", "8MB"])
    assert "pairs/s" in shown and "100%" in shown
    quiet = _run_in_terminal(["run", str(source), "-k", "5", "-o", str(tmp_path / "b.npz"), "--quiet"])
    assert "pairs" not in quiet and "%" not in quiet


def test_no_progress_bar_when_not_a_terminal(embeddings, tmp_path):
    path, _ = embeddings
    done = subprocess.run([*CLI, "run", str(path), "-k", "5", "-o", str(tmp_path / "o.npz")],
                          capture_output=True, text=True, check=True)
    assert "pairs/s" not in done.stderr
    assert "wrote the 5 nearest neighbours of 3000 rows" in done.stdout


def test_info_reports_shape_problems_and_estimates(tmp_path, capsys):
    X = make_clustered(2000, 16, seed=1)
    X[3] = 0.0
    X[9, 2] = np.inf
    path = tmp_path / "x.npy"
    np.save(path, X)
    assert main(["info", str(path), "-k", "10"]) == 0
    shown = capsys.readouterr().out
    assert "2000 x 16, float32, dense" in shown
    assert "zero rows:   1 (first: 3)" in shown
    assert "NaN/Inf rows: 1 (first: 9)" in shown
    assert "estimate:" in shown and "memory:" in shown


def test_demo_runs_small(capsys):
    assert main(["demo", "-n", "3000", "-d", "16", "-k", "5", "--quiet"]) == 0
    shown = capsys.readouterr().out
    assert "pairs/s" in shown and shown.count("row ") >= 5


def test_parquet_input_with_embedding_and_id_columns(tmp_path):
    """The README's command: parquet in, parquet out, ids from a column."""
    pd = pytest.importorskip("pandas")
    X = make_clustered(1200, 16, n_clusters=10, seed=8)
    frame = pd.DataFrame({"item_id": [f"sku-{i:05d}" for i in range(1200)], "emb": list(X)})
    source = tmp_path / "embeddings.parquet"
    frame.to_parquet(source)
    out = tmp_path / "neighbors.parquet"
    argv = ["run", str(source), "--column", "emb", "--id-column", "item_id", "-k", "20", "-o", str(out), "-q"]
    assert main(argv) == 0
    table = pd.read_parquet(out)
    want = allknn.neighbors_frame(frame, embedding="emb", id="item_id", k=20)
    np.testing.assert_array_equal(table["id"].to_numpy(), want["item_id"].to_numpy())
    np.testing.assert_array_equal(table["neighbor_id"].to_numpy(), want["neighbor_id"].to_numpy())
    np.testing.assert_array_equal(table["similarity"].to_numpy(), want["similarity"].to_numpy())


def test_npz_input_names_its_array_with_column(tmp_path):
    X = make_clustered(500, 8, n_clusters=5, seed=9)
    source = tmp_path / "arrays.npz"
    np.savez(source, emb=X, other=np.zeros(3))
    out = tmp_path / "o.npz"
    assert main(["run", str(source), "--column", "emb", "-k", "4", "-o", str(out), "-q"]) == 0
    np.testing.assert_array_equal(load_result(out).indices, allknn.neighbors(X, 4).indices)


def test_sparse_npz_from_scipy_save_npz(tmp_path, capsys):
    import scipy.sparse

    X = scipy.sparse.random(800, 3000, density=0.01, format="csr", random_state=2, dtype=np.float32)
    X = X[np.diff(X.indptr) > 0]
    source = tmp_path / "tfidf.npz"
    scipy.sparse.save_npz(source, X)
    out = tmp_path / "o.npz"
    assert main(["run", str(source), "-k", "5", "-o", str(out), "-q"]) == 0
    np.testing.assert_array_equal(load_result(out).indices, allknn.neighbors(X, 5).indices)
    capsys.readouterr()
    assert main(["info", str(source)]) == 0
    shown = capsys.readouterr().out
    assert f"{X.shape[0]} x 3000, float32, sparse, {X.nnz} stored values" in shown
    assert re.search(r"estimate: +[0-9.]+ s for the exact self-join with k=10 .*sample of its tiles", shown)
    assert "memory:      about" in shown and "block_rows=" in shown


def test_info_on_sparse_rows_with_empty_ones(tmp_path, capsys):
    """Empty rows are reported, and the estimate is made without them."""
    import scipy.sparse

    X = scipy.sparse.random(300, 500, density=0.02, format="lil", random_state=3, dtype=np.float32)
    X[[4, 7]] = 0
    source = tmp_path / "users.npz"
    scipy.sparse.save_npz(source, X.tocsr())
    assert main(["info", str(source), "-k", "5"]) == 0
    shown = capsys.readouterr().out
    assert "zero rows:   " in shown and "4, 7" in shown
    assert "estimate:" in shown

"""Every CLI argument is validated when parsed: a bad value is a one-line error naming the argument
(exit status 2, or 1 for checks across arguments), never a traceback, never a run doing something else
than asked. Resuming with another ``--batch-tokens`` is refused."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from conftest import activation_folder
from sae_hooks.app.cli import main
from sae_hooks.app.commands import train as train_command


T = ["train", "--out", "{out}"]
C = ["capture", "--site", "transformer.h.0", "--out", "{out}"]
BAD: dict[str, tuple[list[str], str]] = {
    "capture_shard_tokens_0": (C + ["--shard-tokens", "0"], "--shard-tokens"),
    "capture_shard_tokens_negative": (C + ["--shard-tokens", "-5"], "--shard-tokens"),
    "capture_shard_tokens_text": (C + ["--shard-tokens", "many"], "--shard-tokens"),
    "capture_max_batches_0": (C + ["--max-batches", "0"], "--max-batches"),
    "capture_seq_len_0": (C + ["--seq-len", "0"], "--seq-len"),
    "capture_batch_size_negative": (C + ["--batch-size", "-1"], "--batch-size"),
    "capture_texts_missing": (C + ["--texts", "{tmp}/nope.txt"], "--texts"),
    "capture_model_missing": (C + ["--model", "{tmp}/nomodel"], "--model"),
    "capture_out_is_file": (["capture", "--site", "x", "--out", "{file}"], "--out"),
    "train_steps_negative": (T + ["--steps", "-1"], "--steps"),
    "train_steps_0": (T + ["--steps", "0"], "--steps"),
    "train_epochs_0": (T + ["--epochs", "0"], "--epochs"),
    "train_checkpoint_every_0": (T + ["--checkpoint-every", "0"], "--checkpoint-every"),
    "train_batch_tokens_0": (T + ["--batch-tokens", "0"], "--batch-tokens"),
    "train_buffer_tokens_negative": (T + ["--buffer-tokens", "-1"], "--buffer-tokens"),
    "train_k_0": (T + ["--k", "0"], "--k"),
    "train_d_sae_0": (T + ["--d-sae", "0"], "--d-sae"),
    "train_expansion_float": (T + ["--expansion", "1.5"], "--expansion"),
    "train_lr_0": (T + ["--lr", "0"], "--lr"),
    "train_lr_nan": (T + ["--lr", "nan"], "--lr"),
    "train_lr_inf": (T + ["--lr", "inf"], "--lr"),
    "train_l1_negative": (T + ["--l1", "-1"], "--l1"),
    "train_l0_text": (T + ["--l0", "x"], "--l0"),
    "train_warmup_negative": (T + ["--warmup", "-3"], "--warmup"),
    "train_dead_tokens_0": (T + ["--dead-tokens", "0"], "--dead-tokens"),
    "train_seeds_negative": (T + ["--seeds", "-1"], "--seeds"),
    "train_seed_text": (T + ["--seed", "abc"], "--seed"),
    "train_device_bogus": (T + ["--device", "gpu7"], "--device"),
    "train_arch_bogus": (T + ["--arch", "sparse"], "--arch"),
    "train_activations_missing": (T + ["--activations", "{tmp}/none"], "--activations"),
    "train_resume_missing": (T + ["--resume", "{tmp}/none"], "--resume"),
    "train_dist_timeout_0": (T + ["--dist-timeout", "0"], "--dist-timeout"),
    "train_dist_timeout_negative": (T + ["--dist-timeout", "-10"], "--dist-timeout"),
    "eval_batches_0": (["eval", "{tmp}", "--batches", "0"], "--batches"),
    "eval_sae_missing": (["eval", "{tmp}/nosae"], "sae"),
    "demo_steps_0": (["demo", "--steps", "0"], "--steps"),
    "demo_threads_0": (["demo", "--threads", "0"], "--threads"),
}
# Checks across arguments (exit status 1, message naming both).
CROSS: dict[str, tuple[list[str], str]] = {
    "buffer_smaller_than_batch": (T + ["--activations", "{acts}", "--batch-tokens", "512", "--buffer-tokens", "256"],
                                  "--buffer-tokens"),
    "checkpoint_every_without_dir": (T + ["--activations", "{acts}", "--checkpoint-every", "5"], "--checkpoint-dir"),
    "k_above_d_sae": (T + ["--activations", "{acts}", "--d-sae", "8", "--k", "9"], "--k"),
    "seeds_repeated": (T + ["--activations", "{acts}", "--seeds", "1", "1"], "--seeds"),
    "dist_timeout_without_distributed": (T + ["--activations", "{acts}", "--dist-timeout", "60"], "--distributed"),
}


def _fill(args: list[str], tmp_path: Path) -> list[str]:
    (tmp_path / "afile").write_text("x")
    acts = tmp_path / "acts"
    if not acts.exists():
        activation_folder(acts)
    return [a.format(out=tmp_path / "out", tmp=tmp_path, file=tmp_path / "afile", acts=acts) for a in args]


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_argument_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture, case: str) -> None:
    args, name = BAD[case]
    with pytest.raises(SystemExit) as exit_:
        main(_fill(args, tmp_path))
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert name in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing was started


@pytest.mark.parametrize("case", sorted(CROSS))
def test_inconsistent_arguments_are_refused_before_work(tmp_path: Path, capsys: pytest.CaptureFixture, case: str) -> None:
    args, name = CROSS[case]
    with pytest.raises(SystemExit) as exit_:
        main(_fill(args, tmp_path))
    msg = str(exit_.value.code) + capsys.readouterr().err
    assert exit_.value.code not in (0, None) and name in msg and "Traceback" not in msg
    assert not (tmp_path / "out").exists()


def test_resume_with_another_batch_tokens_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    acts = _fill([], tmp_path) or tmp_path / "acts"
    base = ["train", "--activations", str(acts), "--d-sae", "16", "--k", "4", "--buffer-tokens", "256",
            "--no-progress", "--checkpoint-dir", str(tmp_path / "ckpt"), "--checkpoint-every", "2"]
    assert main(base + ["--out", str(tmp_path / "o1"), "--steps", "2", "--batch-tokens", "64"]) == 0
    capsys.readouterr()
    rc = main(base + ["--out", str(tmp_path / "o2"), "--steps", "4", "--batch-tokens", "32",
                      "--resume", str(tmp_path / "ckpt")])
    err = capsys.readouterr().err
    assert rc == 1 and "batch_tokens=64" in err and "Traceback" not in err
    assert not (tmp_path / "o2").exists()
    # The same batch size resumes.
    assert main(base + ["--out", str(tmp_path / "o3"), "--steps", "4", "--batch-tokens", "64",
                        "--resume", str(tmp_path / "ckpt")]) == 0


def test_dist_timeout_reaches_the_process_group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import contextlib

    from sae_hooks.train import distributed

    seen = {}

    @contextlib.contextmanager
    def fake_context(backend=None, timeout=timedelta(minutes=30)):  # noqa: ANN001, ANN202
        seen["timeout"] = timeout
        raise SystemExit(0)
        yield  # pragma: no cover

    monkeypatch.setattr(distributed, "distributed_context", fake_context)
    with pytest.raises(SystemExit):
        main(_fill(T + ["--activations", "{acts}", "--distributed", "ddp", "--dist-timeout", "42.5"], tmp_path))
    assert seen["timeout"] == timedelta(seconds=42.5)
    assert train_command.DIST_TIMEOUT == 1800.0  # the default stays torch's 30 minutes


@pytest.mark.parametrize("scale,why", [(0.0, "is 0"), (1e-30, "underflows"), (1e30, "overflows")])
def test_train_on_degenerate_activations_is_one_line_naming_the_statistic(
    tmp_path: Path, capsys: pytest.CaptureFixture, scale: float, why: str,
) -> None:
    """Every batch degenerate: the run is refused before any step, naming the statistic (issue 14: an empty or
    all-zero start was "norm_scale must be a finite number, got nan")."""
    from safetensors.torch import load_file, save_file

    acts = activation_folder(tmp_path / "acts")
    shard = acts / "shard_00000.safetensors"
    save_file({"s": load_file(str(shard))["s"] * scale}, str(shard))
    rc = main(["train", "--activations", str(acts), "--out", str(tmp_path / "o"), "--d-sae", "16", "--k", "4",
               "--steps", "4", "--batch-tokens", "64", "--buffer-tokens", "256", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err and "nan" not in err.lower()
    assert "input scale: batch 1 of the first 3" in err and why in err
    assert not (tmp_path / "o").exists()

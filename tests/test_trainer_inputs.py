"""The trainer's command line and files under hostile input: every bad flag or file is refused before any reference
is built, with the flag or file, what was wrong and the fix; nothing computed is lost when an output cannot be
written; checkpoints, resumes, the reference cache and file permissions."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import stat
import warnings

import pytest
import torch

from consistency_solver.solver import load_coefficients
from consistency_solver.training.evaluation.references import reference_finals, seeded_batch, training_seeds
from consistency_solver.training.testbeds import get_testbed
from consistency_solver.training.testbeds.train_networks import save_weights
from consistency_solver.training.trainer import cli, loop
from consistency_solver.training.trainer.cli import main
from consistency_solver.training.trainer.data import ReferenceSettings, bed_problem
from consistency_solver.training.trainer.loop import TrainConfig, train
from consistency_solver.training.trainer.rewards import make_reward

BED = "gmm-vector-eps"

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_run(tmp_path, *extra: str, output: str | os.PathLike | None = None) -> list[str]:
    """A run of seconds: two updates of the direct mode on 8 noises."""
    output = tmp_path / "out.safetensors" if output is None else output
    return [
        "--bed", BED, "--mode", "direct", "--steps", "4-5", "--updates", "2", "--batch", "2",
        "--train-count", "8", "--held-out-count", "8", "--references-dir", str(tmp_path / "refs"),
        "--output", str(output), "--no-progress", *extra,
    ]  # fmt: skip


def refusal(argv: list[str]) -> str:
    """What the trainer says when it refuses ``argv``: argparse's error (exit status 2, on stderr) or its own."""
    stderr = io.StringIO()
    with pytest.raises(SystemExit) as raised, contextlib.redirect_stderr(stderr):
        main(argv)
    return stderr.getvalue() if raised.value.code == 2 else str(raised.value.code)


def no_references_built(tmp_path) -> bool:
    return not any((tmp_path / "refs").glob("*.safetensors"))


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--lr", "-1"),
        ("--lr", "nan"),
        ("--lr", "inf"),
        ("--lr", "0"),
        ("--updates", "0"),
        ("--updates", "-3"),
        ("--batch", "0"),
        ("--train-count", "0"),
        ("--train-count", "10001"),
        ("--mixture-batch", "-1"),
        ("--mixture-share", "1"),
        ("--mixture-share", "nan"),
        ("--mixture-train-count", "0"),
        ("--held-out-count", "0"),
        ("--threads", "-2"),
        ("--threads", "0"),
        ("--order", "1"),
        ("--bins", "1"),
        ("--hidden", "0"),
        ("--groups", "0"),
        ("--rollouts", "1"),
        ("--epochs", "0"),
        ("--clip", "0"),
        ("--clip", "1.5"),
        ("--entropy-coef", "-0.1"),
        ("--std-floor", "0"),
        ("--grad-clip", "0"),
        ("--weight-decay", "-1"),
        ("--weight-decay", "nan"),
        ("--eval-every", "-1"),
        ("--checkpoint-every", "0"),
        ("--reference-steps", "0"),
        ("--steps", "0-3"),
        ("--report-steps", "9"),
        ("--cfg", "nan"),
        ("--width", "100"),
        ("--height", "0"),
    ],
)
def test_a_bad_number_is_refused_up_front_naming_the_flag_and_the_value(tmp_path, flag, value):
    message = refusal(tiny_run(tmp_path, flag, value))
    assert f"error: argument {flag}: use " in message and value in message
    assert no_references_built(tmp_path)
    assert not (tmp_path / "out.safetensors").exists()


def test_mixed_eps_and_flow_beds_and_a_malformed_model_family_are_refused_up_front(tmp_path):
    message = refusal(tiny_run(tmp_path, "--bed", "gmm-vector-flow"))
    assert "--bed" in message and "gmm-vector-flow" in message and "eps" in message
    message = refusal(tiny_run(tmp_path, "--model-family", "sd15"))
    assert "--model-family" in message and "sd15-eps" in message
    message = refusal(tiny_run(tmp_path, "--model-family", "sd3-flow"))
    assert "--model-family" in message and "eps" in message
    assert no_references_built(tmp_path)


def test_an_output_without_the_safetensors_suffix_is_refused_up_front(tmp_path):
    message = refusal(tiny_run(tmp_path, output=tmp_path / "noext"))
    assert "--output" in message and "noext.safetensors" in message
    assert no_references_built(tmp_path) and not (tmp_path / "noext").exists()


def test_a_folder_as_output_and_an_unwritable_folder_are_refused_before_training(tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    message = refusal(tiny_run(tmp_path, output=folder))
    assert "--output" in message and str(folder) in message
    not_a_folder = tmp_path / "notes.txt"
    not_a_folder.write_text("a file where the output folder should be")
    message = refusal(tiny_run(tmp_path, output=not_a_folder / "x.safetensors"))
    assert str(not_a_folder) in message and "--output" in message
    message = refusal(tiny_run(tmp_path, "--report-dir", str(not_a_folder)))
    assert str(not_a_folder) in message and "--report-dir" in message
    message = refusal(tiny_run(tmp_path, "--checkpoint", str(not_a_folder / "run.ckpt")))
    assert str(not_a_folder) in message and "--checkpoint" in message
    message = refusal(tiny_run(tmp_path, "--references-dir", str(not_a_folder / "refs")))
    assert str(not_a_folder) in message and "--references-dir" in message
    assert no_references_built(tmp_path)


def test_a_failed_write_at_the_end_keeps_the_checkpoint_and_resume_writes_the_file(tmp_path, monkeypatch):
    output = tmp_path / "out.safetensors"

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(cli, "save_coefficients", disk_full)
        message = refusal(tiny_run(tmp_path))
    assert str(output) in message and "No space left on device" in message
    assert "--resume" in message and str(tmp_path / "out.safetensors.ckpt") in message
    assert torch.load(tmp_path / "out.safetensors.ckpt", weights_only=True)["update"] == 2

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run is not trained again")

    monkeypatch.setattr(loop, "direct_update", no_training)
    main(tiny_run(tmp_path, "--resume"))
    assert json.loads(load_coefficients(output).metadata["training"])["updates"] == 2


def test_a_failed_checkpoint_write_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    settings = ReferenceSettings(train_count=8, held_out_count=8, cache_dir=str(tmp_path / "refs"))
    problem = bed_problem(BED, make_reward("rmse"), settings)
    config = TrainConfig(mode="direct", steps=(4,), updates=4, batch=2, checkpoint_every=1)
    checkpoint = tmp_path / "run.ckpt"
    save = torch.save
    calls = []

    def fails_the_second_time(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return save(obj, path, *args, **kwargs)

    monkeypatch.setattr(loop.torch, "save", fails_the_second_time)
    with pytest.raises(OSError, match="update 2") as raised:
        train(config, [problem], checkpoint=checkpoint, progress=False)
    assert str(checkpoint) in str(raised.value) and "update 1" in str(raised.value)
    assert len(calls) == 2  # the run stopped at the failed write
    monkeypatch.setattr(loop.torch, "save", save)
    assert torch.load(checkpoint, weights_only=True)["update"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["refs", "run.ckpt"]  # no partial file left behind


def damaged(path, kind: str) -> None:
    intact = path.read_bytes()
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(intact[: len(intact) // 2])
    elif kind == "text":
        path.write_text("hello\n")
    elif kind == "dict without a run":
        torch.save({"config": {}}, path)
    else:
        torch.save([1, 2], path)


@pytest.mark.parametrize("kind", ["empty", "truncated", "text", "dict without a run", "list"])
def test_resume_from_a_damaged_checkpoint_names_the_file_and_the_fix(tmp_path, kind):
    main(tiny_run(tmp_path, "--updates", "1"))
    checkpoint = tmp_path / "out.safetensors.ckpt"
    damaged(checkpoint, kind)
    for cached in (tmp_path / "refs").iterdir():
        cached.unlink()
    message = refusal(tiny_run(tmp_path, "--resume"))
    assert str(checkpoint) in message and "--resume" in message and "--checkpoint" in message
    assert no_references_built(tmp_path)


def test_resume_without_a_checkpoint_is_refused_naming_the_path(tmp_path):
    message = refusal(tiny_run(tmp_path, "--resume"))
    assert str(tmp_path / "out.safetensors.ckpt") in message and "--resume" in message
    assert no_references_built(tmp_path)


def test_resume_with_other_settings_lists_only_the_settings_that_differ(tmp_path):
    main(tiny_run(tmp_path, "--updates", "1"))
    message = refusal(tiny_run(tmp_path, "--resume", "--seed", "5", "--rollouts", "8"))
    assert "--seed 0" in message and "--rollouts 16" in message and "5" in message
    for same in ("ppo", "--lr", "--steps", "--batch", "--mode"):
        assert same not in message
    main(tiny_run(tmp_path, "--resume", "--updates", "3", "--checkpoint-every", "1"))  # these may change
    assert torch.load(tmp_path / "out.safetensors.ckpt", weights_only=True)["update"] == 3


def test_checkpoint_every_sets_how_many_updates_a_crash_can_lose(tmp_path, monkeypatch):
    direct_update = loop.direct_update
    done = []

    def interrupted_in_the_third_update(*args, **kwargs):
        if len(done) == 2:
            raise KeyboardInterrupt
        done.append(1)
        return direct_update(*args, **kwargs)

    monkeypatch.setattr(loop, "direct_update", interrupted_in_the_third_update)
    message = refusal(tiny_run(tmp_path, "--updates", "5", "--checkpoint-every", "1"))
    checkpoint = tmp_path / "out.safetensors.ckpt"
    assert torch.load(checkpoint, weights_only=True)["update"] == 2
    assert "--resume" in message and str(checkpoint) in message
    assert TrainConfig().checkpoint_every <= 50


def test_a_resumed_run_records_the_seconds_of_all_its_runs(tmp_path):
    main(tiny_run(tmp_path, "--updates", "1"))
    checkpoint = tmp_path / "out.safetensors.ckpt"
    saved = torch.load(checkpoint, weights_only=True)
    assert 0 < saved["seconds"] < 1000
    torch.save({**saved, "seconds": 1000.0}, checkpoint)  # as if the first run had taken 1000 s
    main(tiny_run(tmp_path, "--resume"))
    assert 1000 < torch.load(checkpoint, weights_only=True)["seconds"] < 1000 + 600  # plus the resumed part
    seconds = json.loads(load_coefficients(tmp_path / "out.safetensors").metadata["training"])["seconds"]
    assert 1000 <= seconds < 1000 + 600


def test_written_files_get_the_permissions_of_the_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        main(tiny_run(tmp_path))
        save_weights(torch.nn.Linear(2, 2), tmp_path / "net.safetensors", {"steps": 1})
    finally:
        os.umask(previous)
    written = [
        tmp_path / "net.safetensors",
        tmp_path / "out.safetensors",
        tmp_path / "out.safetensors.ckpt",
        tmp_path / "out" / "report.json",
        tmp_path / "out" / "report.png",
        *(tmp_path / "refs").glob("*.safetensors"),
    ]
    assert len(written) == 7
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, path


@pytest.mark.parametrize(
    "damage",
    [b"", b"\x10\x00\x00\x00\x00\x00\x00\x00{", b"\xff" * 100],
    ids=["empty", "header cut short", "header length too large"],
)
def test_a_damaged_reference_cache_file_is_named_and_rebuilt(tmp_path, damage):
    bed = get_testbed(BED)
    noise, labels = seeded_batch(bed, training_seeds(4))
    fresh = reference_finals(bed, noise, labels, method="multistep", cache_dir=tmp_path)
    (cached,) = tmp_path.iterdir()
    cached.write_bytes(damage)
    with pytest.warns(UserWarning, match=re.escape(str(cached))):
        again = reference_finals(bed, noise, labels, method="multistep", cache_dir=tmp_path)
    assert torch.equal(again, fresh)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rebuilt: the next run reads it without a warning
        assert torch.equal(reference_finals(bed, noise, labels, method="multistep", cache_dir=tmp_path), fresh)

"""Regression tests for issue 26, items 11-13: files that are damaged, misplaced or edited by hand.

11. a truncated or corrupt ``*.safetensors`` weight file is one line naming the file (exit 2), found from its
    header before ``from_pretrained``;
12. an unwritable ``DLP_CACHE`` is reported naming DLP_CACHE before a GGUF conversion starts;
13. mask metadata edited after it was written is refused (``--force``: a warning), and ``report``/``verify`` show
    per-layer sparsities measured from the bits beside the recorded ones.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import REPO, save_tiny_model, tiny_model, tiny_tokenizer
from dlp import modeling
from dlp.errors import DlpError
from dlp.rundir import MARKER
from dlp.masks import MaskSet, model_fingerprint, pack_bits
from dlp.modeling import load_model_and_tokenizer, prunable_linears, resolve_model_dir

PRUNE = str(REPO / "train" / "prune.py")
MASKS_TOOL = str(REPO / "train" / "masks.py")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_script(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, script, *args], cwd=REPO, capture_output=True, text=True, env=env or ENV, timeout=300
    )


def one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    return lines[0]


def truncate(path: Path, fraction: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


# --- 11. truncated or corrupt weight files ---------------------------------------------------------------------------
def test_truncated_model_safetensors_is_one_line_naming_the_file(tmp_path, tiny_args):
    """The regression: 10 of 28 MB of model.safetensors gave a safetensors traceback and exit 1."""
    model_dir = save_tiny_model(tmp_path / "model")
    weights = model_dir / "model.safetensors"
    truncate(weights, 10 / 28)
    out = tmp_path / "run"
    result = run_script(PRUNE, *tiny_args, "--output_dir", str(out), "--model_name_or_path", str(model_dir))
    assert result.returncode == 2
    line = one_error_line(result)
    assert line.startswith(f"error: model: {weights} is truncated or corrupt (")
    assert f"{weights.stat().st_size} bytes, but its header describes" in line
    assert not out.exists()  # found before anything was written


def test_a_truncated_model_dlp_wrote_says_rerun_the_stage(tmp_path):
    model_dir = save_tiny_model(tmp_path / "model")
    (model_dir / MARKER).write_text("")
    truncate(model_dir / "model.safetensors", 0.5)
    with pytest.raises(
        DlpError, match=r"is truncated or corrupt .*; rerun the stage that wrote it, or use --overwrite"
    ):
        load_model_and_tokenizer(str(model_dir))


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"these are not weights\n", "its header length"),
        (b"abc", "3 bytes, too short for a safetensors header"),
        (len(b"{not json}").to_bytes(8, "little") + b"{not json}", "its header is not valid JSON"),
        (len(b"[1, 2]").to_bytes(8, "little") + b"[1, 2]", "its header does not describe tensors"),
    ],
)
def test_a_corrupt_header_is_one_line(tmp_path, content, reason):
    model_dir = save_tiny_model(tmp_path / "model")
    (model_dir / "model.safetensors").write_bytes(content)
    with pytest.raises(DlpError, match=rf"model: .*model\.safetensors is truncated or corrupt \({reason}"):
        resolve_model_dir(str(model_dir))


def test_sharded_checkpoint_every_shard_is_checked(tmp_path):
    model_dir = tmp_path / "sharded"
    tiny_model("llama").save_pretrained(model_dir, max_shard_size="40KB")
    tiny_tokenizer().save_pretrained(model_dir)
    shards = sorted(model_dir.glob("model-*.safetensors"))
    assert len(shards) >= 3 and (model_dir / "model.safetensors.index.json").is_file()
    assert resolve_model_dir(str(model_dir)) == str(model_dir)  # intact: accepted
    truncate(shards[-1], 0.9)
    with pytest.raises(DlpError, match=rf"model: {shards[-1]} is truncated or corrupt"):
        resolve_model_dir(str(model_dir))
    shards[-1].unlink()
    with pytest.raises(DlpError, match=rf"model: {shards[-1]} is missing \(a shard the index names\)"):
        resolve_model_dir(str(model_dir))


def test_from_pretrained_safetensors_errors_become_one_line_but_bugs_stay(tmp_path, monkeypatch):
    """A hub download is not checked in advance (it lives in the hub's cache): safetensors' own error is caught;
    an unrelated exception from loading keeps its type and traceback."""
    model_dir = save_tiny_model(tmp_path / "model")
    truncate(model_dir / "model.safetensors", 0.5)
    monkeypatch.setattr(modeling, "check_weight_files", lambda directory, remedy: None)
    with pytest.raises(DlpError, match=r"model: a weight file of .* is truncated or corrupt \(.*incomplete metadata"):
        load_model_and_tokenizer(str(model_dir))

    def bug(*args, **kwargs):
        raise RuntimeError("a programming error")

    monkeypatch.setattr(modeling, "_from_pretrained_with_attention_fallback", bug)
    with pytest.raises(RuntimeError, match="a programming error"):
        load_model_and_tokenizer(str(model_dir))


# --- 12. DLP_CACHE -------------------------------------------------------------------------------------------------
@pytest.fixture
def fake_gguf(tmp_path) -> Path:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x01" * 7)
    return gguf


@pytest.fixture
def no_conversion(monkeypatch):
    """Fail the test if a GGUF conversion starts: the cache must be checked first."""

    def convert(gguf_file, target):
        pytest.fail(f"converted {gguf_file} before checking the cache")

    monkeypatch.setattr(modeling, "_convert_gguf", convert)


def _unwritable_places(tmp_path: Path) -> list[Path]:
    """Places even root cannot create: beneath a regular file, and in sysfs (where there is one)."""
    afile = tmp_path / "afile"
    afile.write_text("a file, not a directory")
    return [afile / "sub"] + ([Path("/sys/dlp-cache-test")] if Path("/sys/kernel").is_dir() else [])


def test_unwritable_dlp_cache_is_named_before_conversion(tmp_path, monkeypatch, fake_gguf, no_conversion):
    for cache in _unwritable_places(tmp_path):
        monkeypatch.setenv("DLP_CACHE", str(cache))
        with pytest.raises(DlpError) as raised:
            resolve_model_dir(str(fake_gguf))
        message = str(raised.value)
        assert message.startswith(f"DLP_CACHE: cannot write the converted model cache at {cache}/gguf (")
        assert message.endswith("); set DLP_CACHE to a writable directory") and "output_dir" not in message
        assert not cache.exists()


def test_unset_dlp_cache_names_the_default(tmp_path, monkeypatch, fake_gguf, no_conversion):
    home = _unwritable_places(tmp_path)[0]
    monkeypatch.delenv("DLP_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(DlpError, match=r"^~/\.cache/dlp \(DLP_CACHE unset\): cannot write .* set DLP_CACHE to a"):
        resolve_model_dir(str(fake_gguf))


def test_unwritable_dlp_cache_cli_is_one_line_before_any_work(tmp_path, tiny_args, fake_gguf):
    cache = _unwritable_places(tmp_path)[0]
    out = tmp_path / "run"
    result = run_script(
        PRUNE,
        *tiny_args,
        "--output_dir",
        str(out),
        "--model_name_or_path",
        str(fake_gguf),
        env={**ENV, "DLP_CACHE": str(cache)},
    )
    assert result.returncode == 2
    line = one_error_line(result)
    assert line.startswith(f"error: DLP_CACHE: cannot write the converted model cache at {cache}/gguf (")
    assert "cannot read" not in line and not out.exists()  # the (bogus) GGUF was never opened


def test_writable_cache_converts_once_and_is_checked(tmp_path, monkeypatch, fake_gguf):
    calls = []

    def convert(gguf_file, target):
        calls.append(target)
        save_tiny_model(target)

    monkeypatch.setattr(modeling, "_convert_gguf", convert)
    monkeypatch.setenv("DLP_CACHE", str(tmp_path / "cache"))
    first = resolve_model_dir(str(fake_gguf))
    assert resolve_model_dir(str(fake_gguf)) == first and len(calls) == 1
    assert sorted(p.name for p in (tmp_path / "cache" / "gguf").iterdir()) == [Path(first).name]  # no probe left
    truncate(Path(first) / "model.safetensors", 0.5)
    with pytest.raises(
        DlpError, match=rf"is truncated or corrupt .*; delete {first} and dlp converts model.gguf again"
    ):
        resolve_model_dir(str(fake_gguf))


@pytest.mark.parametrize(
    "code, expected",
    [
        (errno.EIO, r"^DLP_CACHE: cannot write the converted model cache at .*m-1 \(OSError: Input/output error\)"),
        (errno.ENOSPC, r"^DLP_CACHE: no space left on the device of .*"),
    ],
)
def test_an_oserror_while_writing_the_cache_names_dlp_cache(tmp_path, monkeypatch, code, expected):
    class FailingWrite:
        def save_pretrained(self, path):
            raise OSError(code, os.strerror(code))

    monkeypatch.setenv("DLP_CACHE", str(tmp_path / "cache"))
    target = tmp_path / "cache" / "gguf" / "m-1"
    with pytest.raises(DlpError, match=expected) as raised:
        modeling._write_converted(FailingWrite(), FailingWrite(), target)
    assert str(raised.value).endswith("set DLP_CACHE to a writable directory") and "output_dir" not in str(raised.value)
    assert not target.exists() and list(target.parent.iterdir()) == []  # no half-written temporary left


# --- 13. mask metadata edited by hand ------------------------------------------------------------------------------
SPARSITIES = [0.5, 0.6, 0.8]


def _exact_masks(seed: int = 0) -> tuple[MaskSet, torch.nn.Module]:
    """Masks of the tiny 3-layer Llama dropping exactly round(numel·s) weights of every module of layer i."""
    model = tiny_model("llama")
    gen = torch.Generator().manual_seed(seed)
    masks = {}
    for name, linear in prunable_linears(model).items():
        numel = linear.weight.numel()
        drop = torch.randperm(numel, generator=gen)[: round(numel * SPARSITIES[int(name.split(".")[2])])]
        keep = torch.ones(numel, dtype=torch.bool)
        keep[drop] = False
        masks[name] = keep.view(linear.weight.shape)
    metadata = {"model": "tiny-llama", "fingerprint": model_fingerprint(model), "layer_sparsities": SPARSITIES}
    return MaskSet(masks, metadata), model


def _rewrite_metadata(path: Path, drop_checksum: bool = False, **changes) -> None:
    """Edit the metadata JSON in a mask file's safetensors header by hand, as a user with an editor would: the
    header is re-padded and its length rewritten, the tensor bytes stay as they are (the file stays valid)."""
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    stored = header["__metadata__"]
    stored["metadata"] = json.dumps({**json.loads(stored["metadata"]), **changes}, sort_keys=True)
    if drop_checksum:
        del stored["metadata_sha256"]
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + data[8 + length :])


@pytest.fixture
def forged(tmp_path) -> Path:
    masks, _ = _exact_masks()
    path = masks.save(tmp_path / "masks.safetensors")
    _rewrite_metadata(path, layer_sparsities=[0.7, 0.7, 0.7], model="meta-llama/Llama-3-70B")
    return path


@pytest.fixture
def masked_model_dir(tmp_path) -> Path:
    """The tiny Llama with :func:`_exact_masks` applied, saved: a model that obeys the forged file's bits."""
    masks, model = _exact_masks()
    masks.apply(model)
    model.save_pretrained(tmp_path / "masked")
    tiny_tokenizer().save_pretrained(tmp_path / "masked")
    return tmp_path / "masked"


def test_two_saves_of_the_same_masks_are_identical_bytes(tmp_path):
    masks, _ = _exact_masks()
    again = MaskSet(dict(reversed(list(masks.masks.items()))), json.loads(json.dumps(masks.metadata)))
    first, second = masks.save(tmp_path / "a.safetensors"), again.save(tmp_path / "b.safetensors")
    assert first.read_bytes() == second.read_bytes()
    with safe_open(str(first), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["metadata_sha256"] == hashlib.sha256(meta["metadata"].encode()).hexdigest()
    assert MaskSet.load(first).metadata_check == "ok"


def test_digest_is_unchanged_by_the_metadata_checksum():
    """Reports and benchmarks compare digests across versions: it is still SHA-256 over names, shapes and bits."""
    mask = torch.tensor([[True, False, True, True, False], [False, False, False, True, True]])
    expected = hashlib.sha256(b"m:(2, 5);" + pack_bits(mask).numpy().tobytes()).hexdigest()
    assert MaskSet({"m": mask}, {"anything": 1}).digest() == expected


def test_edited_metadata_is_refused_in_one_line_and_warned_with_force(forged):
    with pytest.raises(DlpError) as raised:
        MaskSet.load(forged)
    assert str(raised.value) == (
        f"masks: {forged}: its metadata was edited after it was written (metadata checksum mismatch); the bits are "
        "intact (digest ok), but its model name, recipe and layer sparsities are not the recorded ones "
        "(train/masks.py --force reads it anyway)"
    )
    with pytest.warns(UserWarning, match="reading it anyway because of --force"):
        loaded = MaskSet.load(forged, force=True)
    assert loaded.metadata_check == "mismatch" and loaded.metadata["layer_sparsities"] == [0.7, 0.7, 0.7]
    assert loaded.measured_layer_sparsities() == pytest.approx(SPARSITIES, abs=1e-3)
    assert "layer 0: recorded 70.00%, measured 50.00%" in loaded.layer_sparsity_disagreement()


def test_verify_and_report_refuse_edited_metadata(forged, masked_model_dir):
    for args in (
        ["verify", "--masks", str(forged), "--model", str(masked_model_dir)],
        ["report", "--masks", str(forged)],
    ):
        result = run_script(MASKS_TOOL, *args)
        assert result.returncode == 2, args
        assert "its metadata was edited after it was written (metadata checksum mismatch)" in one_error_line(result)


def test_report_with_force_warns_and_shows_measured_sparsities(forged):
    result = run_script(MASKS_TOOL, "report", "--force", "--masks", str(forged))
    assert result.returncode == 0, result.stderr[-2000:]
    shown = json.loads(result.stdout)
    assert shown["metadata_check"] == "mismatch" and shown["layer_sparsities"] == [0.7, 0.7, 0.7]
    assert shown["measured_layer_sparsities"] == pytest.approx(SPARSITIES, abs=1e-3)
    assert "its metadata was edited after it was written" in result.stderr
    assert (
        "warning: masks: the recorded layer_sparsities disagree with the bits (layer 0: recorded 70.00%"
        in result.stderr
    )


def test_verify_with_force_says_the_metadata_was_edited(forged, masked_model_dir):
    result = run_script(MASKS_TOOL, "verify", "--force", "--masks", str(forged), "--model", str(masked_model_dir))
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("0 masked weights are non-zero")
    assert lines[1].startswith("metadata: EDITED after it was written")
    assert lines[2].startswith("warning: the recorded layer_sparsities disagree with the bits (layer 0: recorded 70")


def test_a_file_without_the_checksum_still_loads_and_verify_says_unchecked(tmp_path, masked_model_dir):
    masks, _ = _exact_masks()
    path = masks.save(tmp_path / "old.safetensors")
    _rewrite_metadata(path, drop_checksum=True)  # as dlp wrote it before this change
    loaded = MaskSet.load(path)
    assert loaded.metadata_check == "unchecked" and loaded.metadata == masks.metadata
    assert loaded.digest() == masks.digest() and loaded.layer_sparsity_disagreement() is None
    _rewrite_metadata(path, drop_checksum=False, layer_sparsities=[0.5, 0.6, 0.9])  # an old file, edited
    result = run_script(MASKS_TOOL, "verify", "--masks", str(path), "--model", str(masked_model_dir))
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[1].startswith("metadata: unchecked (the file was written before dlp recorded a metadata checksum")
    assert lines[2].startswith("warning: the recorded layer_sparsities disagree with the bits (layer 2: recorded 90")


def test_honest_masks_verify_checked_without_warnings(tmp_path, masked_model_dir):
    masks, _ = _exact_masks()
    path = masks.save(tmp_path / "masks.safetensors")
    result = run_script(MASKS_TOOL, "verify", "--masks", str(path), "--model", str(masked_model_dir))
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and lines[1].startswith("metadata: checked (its checksum matches")
    assert "warning" not in result.stdout + result.stderr


def test_layer_sparsity_tolerance_is_rounding_only():
    masks, _ = _exact_masks()
    masks.metadata["layer_sparsities"] = [0.5 + 0.004, 0.6 - 0.004, 0.8]  # within rounding: agree
    assert masks.layer_sparsity_disagreement() is None
    masks.metadata["layer_sparsities"] = [0.5, 0.6 + 0.01, 0.8]
    assert "layer 1: recorded 61.00%, measured 59.99%" in masks.layer_sparsity_disagreement()
    masks.metadata["layer_sparsities"] = [0.5, 0.6]
    assert "records 2 layer sparsities; the bits have 3" in masks.layer_sparsity_disagreement()
    unnumbered = MaskSet({"a.weight": torch.ones(2, 2, dtype=torch.bool)}, {"layer_sparsities": [0.5]})
    assert unnumbered.measured_layer_sparsities() is None and unnumbered.layer_sparsity_disagreement() is None

"""`adapterspec train` in process: the loss falls, only adapters change, saved adapters reload and fuse,
resuming from a checkpoint gives the uninterrupted run's weights, options and refusals."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import models as tiny
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from adapterspec.adapters.loading import load_model
from adapterspec.adapters.weights import load_adapters
from adapterspec.errors import UserError
from adapterspec.train.checkpoint import list_checkpoints, read_checkpoint
from adapterspec.train.data import attention_multiple, padded_for_attention
from adapterspec.train.options import TrainOptions, merge_options
from adapterspec.train.report import format_duration
from adapterspec.train.run import run

ROOT = Path(__file__).resolve().parents[2]
LLAMA = str(tiny.example_model_dir("tiny-llama"))
DATA = str(ROOT / "examples" / "data")
ATTENTION = "adapterspec 1\nself_attn.<q_proj,v_proj>: lora(r=8, scale=20)\n"
WITH_DROPOUT = (
    "adapterspec 1\nself_attn.<q_proj,v_proj>: lora(r=4, scale=10, dropout=0.2)\nlayers[-1].mlp.down_proj: dora(r=2)\n"
)


def train(tmp_path: Path, name: str, spec: str = ATTENTION, **overrides):
    spec_path = tmp_path / f"{name}.aspec"
    spec_path.write_text(spec)
    settings = dict(
        model=LLAMA,
        spec=str(spec_path),
        data=DATA,
        adapter_path=str(tmp_path / name),
        learning_rate=1e-3,
        iters=10,
        steps_per_report=5,
        steps_per_eval=1000,
        val_batches=2,
        save_every=5,
    )
    options = TrainOptions(**{**settings, **overrides})
    return run(options, stream=io.StringIO())


def weights(path) -> dict:
    return mx.load(str(Path(path) / "adapters.safetensors"))


def identical(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]).item() for k in a)


def a_batch():
    return mx.array([[1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 2]])


def test_training_lowers_the_loss_changes_only_adapters_and_saves_reloadable_fusable_adapters(tmp_path):
    result = train(tmp_path, "run", iters=30, steps_per_eval=30, val_batches=4, save_every=10)
    (first_step, first), (last_step, last) = result.val_losses[0], result.val_losses[-1]
    assert (first_step, last_step) == (0, 30)
    assert last < first - 0.5, result.val_losses
    assert [step for step, _ in list_checkpoints(result.out)] == [10, 20, 30]

    model, base = result.model, dict(tree_flatten(load_model(LLAMA)[0].parameters()))
    trainable = dict(tree_flatten(model.trainable_parameters()))
    assert set(trainable) == set(weights(result.out)) and all(k.endswith((".lora_a", ".lora_b")) for k in trainable)
    frozen = {k.replace(".linear.", "."): v for k, v in tree_flatten(model.parameters()) if k not in trainable}
    assert frozen.keys() == base.keys()
    assert all(mx.array_equal(frozen[k], base[k]).item() for k in base), "a base weight changed"
    assert all(mx.any(v != 0).item() for k, v in trainable.items() if k.endswith("lora_b"))

    model.eval()
    expected = model(a_batch())
    reloaded = load_model(LLAMA)[0]
    load_adapters(reloaded, result.out)
    assert mx.array_equal(reloaded(a_batch()), expected).item()
    fused = [(path, m.fuse()) for path, m in reloaded.named_modules() if hasattr(m, "lora_a")]
    reloaded.update_modules(tree_unflatten(fused))
    assert fused and not any(hasattr(m, "lora_a") for _, m in reloaded.named_modules())
    assert mx.allclose(reloaded(a_batch()), expected, atol=1e-4, rtol=1e-4).item()

    from mlx_lm.tuner.utils import load_adapters as mlx_lm_load_adapters

    config = json.loads((result.out / "adapter_config.json").read_text())
    assert config["training"]["step"] == 30 and config["fine_tune_type"] == "lora"
    by_mlx_lm = mlx_lm_load_adapters(load_model(LLAMA)[0], str(result.out))
    by_mlx_lm.eval()
    assert mx.allclose(by_mlx_lm(a_batch()), expected, atol=1e-5, rtol=1e-5).item()


def test_resuming_gives_the_uninterrupted_runs_weights_with_dropout_and_gradient_accumulation(tmp_path):
    settings = dict(spec=WITH_DROPOUT, grad_accumulation_steps=2, batch_size=2, save_every=3)
    straight = train(tmp_path, "straight", iters=9, **settings)
    first = train(tmp_path, "resumed", iters=3, **settings)
    state = read_checkpoint(first.out / "checkpoints" / "0000003")
    assert state.grad_accum() is not None, (
        "step 3 is between two updates: its checkpoint holds the accumulated gradient"
    )
    resumed = train(tmp_path, "resumed", iters=9, resume=True, **settings)
    assert resumed.resumed_from == 3 and resumed.step == 9
    assert identical(weights(resumed.out), weights(straight.out))
    assert identical(weights(resumed.out / "checkpoints" / "0000009"), weights(straight.out))
    later = read_checkpoint(resumed.out / "checkpoints" / "0000009")
    assert identical(later.arrays, read_checkpoint(straight.out / "checkpoints" / "0000009").arrays)


def test_queuing_each_step_ahead_gives_the_waiting_loops_weights_losses_and_checkpoints(tmp_path, monkeypatch):
    settings = dict(
        spec=WITH_DROPOUT, grad_accumulation_steps=2, batch_size=2, save_every=3, iters=7, steps_per_report=2
    )
    queued = []
    async_eval = mx.async_eval
    monkeypatch.setattr(mx, "async_eval", lambda *arrays: (queued.append(1), async_eval(*arrays))[1])
    monkeypatch.setenv("ADAPTERSPEC_TRAIN_AHEAD", "0")
    waiting = train(tmp_path, "waiting", **settings)
    assert not queued
    monkeypatch.setenv("ADAPTERSPEC_TRAIN_AHEAD", "1")
    ahead = train(tmp_path, "ahead", **settings)
    assert len(queued) == 2, "steps 1 and 5 neither report, validate nor save: they are queued ahead"
    assert ahead.train_losses == waiting.train_losses and len(ahead.train_losses) == 4
    assert ahead.val_losses == waiting.val_losses
    assert identical(weights(ahead.out), weights(waiting.out))
    for step in ("0000003", "0000006"):
        assert identical(
            read_checkpoint(ahead.out / "checkpoints" / step).arrays,
            read_checkpoint(waiting.out / "checkpoints" / step).arrays,
        )


def test_a_batch_is_padded_to_the_attentions_multiple_only_where_that_adds_little():
    lengths = mx.array([[0, 1024], [0, 700]])
    batch = mx.random.randint(1, 100, (2, 1024))
    padded, kept = padded_for_attention(batch, lengths, 128)
    assert padded.shape == (2, 1025) and kept.tolist() == [[0, 1023], [0, 700]], "the loss's mask as it was"
    assert mx.array_equal(padded[:, :1024], batch).item() and not mx.any(padded[:, 1024:]).item()
    assert padded_for_attention(batch[:, :129], lengths, 128)[0].shape == (2, 129), "128 inputs: a multiple already"
    assert padded_for_attention(batch[:, :481], lengths, 128)[0].shape == (2, 481), "32 more for 480 is too many"


def test_blank_lines_and_an_empty_validation_file_train_as_if_absent(tmp_path):
    lines = (Path(DATA) / "train.jsonl").read_text().splitlines()[:40]
    clean, spaced = tmp_path / "clean", tmp_path / "spaced"
    clean.mkdir()
    spaced.mkdir()
    (clean / "train.jsonl").write_text("\n".join(lines) + "\n")
    (spaced / "train.jsonl").write_text("\n\n".join(lines) + "\n  \n\n")  # mlx-lm's own loader fails on both
    (spaced / "valid.jsonl").write_text("\n")
    settings = dict(iters=4, steps_per_report=2, save_every=4)
    plain = train(tmp_path, "plain", data=str(clean), **settings)
    odd = train(tmp_path, "odd", data=str(spaced), **settings)
    assert odd.val_losses == plain.val_losses == []
    assert odd.train_losses == plain.train_losses and identical(weights(odd.out), weights(plain.out))


def test_batches_are_padded_for_the_attention_by_default_on_a_cuda_gpu_only(monkeypatch):
    monkeypatch.delenv("ADAPTERSPEC_TRAIN_PAD_ATTENTION", raising=False)
    monkeypatch.setattr(mx.cuda, "is_available", lambda: False)
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.cpu))
    assert attention_multiple() == 0
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))
    assert attention_multiple() == 0, "a GPU but not CUDA's (Metal's): attention's backward is never fused there"
    monkeypatch.setattr(mx.cuda, "is_available", lambda: True)
    assert attention_multiple() == 128
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.cpu))
    assert attention_multiple() == 0, "a CUDA build told to run on the CPU"
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))
    for value, multiple in ((" auto ", 128), ("0", 0), ("64", 64)):
        monkeypatch.setenv("ADAPTERSPEC_TRAIN_PAD_ATTENTION", value)
        assert attention_multiple() == multiple, value


def test_padding_batches_for_the_attention_keeps_the_losses_and_weights(tmp_path, monkeypatch):
    from adapterspec.train import data

    widths = []
    pad = data.padded_for_attention
    monkeypatch.setattr(data, "padded_for_attention", lambda *a: widths.append(pad(*a)[0].shape[1]) or pad(*a))
    settings = dict(iters=6, steps_per_report=2, max_seq_length=48)
    monkeypatch.setenv("ADAPTERSPEC_TRAIN_PAD_ATTENTION", "0")
    plain = train(tmp_path, "plain", **settings)
    assert not widths
    monkeypatch.setenv("ADAPTERSPEC_TRAIN_PAD_ATTENTION", "16")
    padded = train(tmp_path, "padded", **settings)
    assert 49 in widths, widths  # batches cut to 48 tokens: 47 inputs, padded to 48
    assert all((w - 1) % 16 == 0 for w in widths), widths
    assert mx.allclose(
        mx.array([loss for _, loss in padded.train_losses]), mx.array([loss for _, loss in plain.train_losses])
    ).item()
    assert mx.allclose(
        mx.array([loss for _, loss in padded.val_losses]), mx.array([loss for _, loss in plain.val_losses])
    ).item()
    plain_weights, padded_weights = weights(plain.out), weights(padded.out)
    assert all(mx.allclose(padded_weights[k], plain_weights[k], atol=1e-5).item() for k in plain_weights)
    for value in ("many", "-128"):
        monkeypatch.setenv("ADAPTERSPEC_TRAIN_PAD_ATTENTION", value)
        with pytest.raises(UserError, match="ADAPTERSPEC_TRAIN_PAD_ATTENTION"):
            train(tmp_path, "refused", **settings)


def test_resume_refuses_other_settings_and_new_runs_refuse_a_used_directory(tmp_path):
    train(tmp_path, "run", iters=5)
    with pytest.raises(UserError, match="learning_rate"):
        train(tmp_path, "run", iters=10, resume=True, learning_rate=5e-4)
    with pytest.raises(UserError, match="not empty"):
        train(tmp_path, "run", iters=10)
    with pytest.raises(UserError, match="no checkpoint"):
        train(tmp_path, "elsewhere", iters=10, resume=True)
    with pytest.raises(UserError, match="past --iters"):
        train(tmp_path, "run", iters=3, resume=True)
    again = train(tmp_path, "run", iters=2, force=True)
    assert [step for step, _ in list_checkpoints(again.out)] == [2]


def test_test_split_reports_loss_and_perplexity(tmp_path, capsys):
    from adapterspec.cli import main

    spec = tmp_path / "a.aspec"
    spec.write_text(ATTENTION)
    code = main(
        [
            "train",
            LLAMA,
            str(spec),
            "--data",
            DATA,
            "--iters",
            "2",
            "--steps-per-report",
            "1",
            "--val-batches",
            "1",
            "--test",
            "--test-batches",
            "2",
            "-o",
            str(tmp_path / "out"),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "Test loss" in out and "Test ppl" in out and "ETA" in out and "tok/s" in out


def test_yaml_config_under_the_command_line_and_mlx_lm_keys_the_spec_replaces(tmp_path):
    from adapterspec.train.options import read_yaml_config

    config_path = tmp_path / "c.yaml"
    config_path.write_text(
        "model: m\nspec: s.aspec\ndata: d\niters: 50\nlearning_rate: 1e-4\nnum_layers: 8\n"
        "lora_parameters: {rank: 8}\noptimizer: AdamW\noptimizer_config: {adamw: {weight_decay: 0.01}}\n"
    )
    options, notes = merge_options({"iters": 7, "batch_size": None}, read_yaml_config(config_path))
    assert (options.iters, options.learning_rate, options.batch_size) == (7, 1e-4, 4)
    assert options.optimizer == "adamw" and options.optimizer_settings == {"weight_decay": 0.01}
    assert any("num_layers" in n for n in notes) and any("lora_parameters" in n for n in notes)
    with pytest.raises(UserError, match="unknown key 'iterations'"):
        merge_options({}, {"iterations": 3, "model": "m", "spec": "s", "data": "d"})
    with pytest.raises(UserError, match="missing spec"):
        merge_options({"model": "m", "data": "d"}, {})
    required = {"model": "m", "spec": "s", "data": "d"}
    nulls = {"learning_rate": None, "batch_size": None, "seed": None, "optimizer": None}
    options, _ = merge_options({}, {**required, **nulls})  # mlx_lm.lora reads a null as the default
    assert (options.learning_rate, options.batch_size, options.seed, options.optimizer) == (1e-5, 4, 0, "adam")
    for key, value, match in (
        ("optimizer", 5, "unknown optimizer 5"),
        ("mask_prompt", "no", "mask_prompt must be true or false, got 'no'"),  # a quoted 'no' was true
        ("grad_checkpoint", 1, "grad_checkpoint must be true or false"),
    ):
        with pytest.raises(UserError, match=match):
            merge_options({}, {**required, key: value})


def test_a_forced_run_keeps_the_previous_one_until_its_first_checkpoint(tmp_path):
    settings = dict(iters=4, steps_per_report=1, save_every=2)
    first = train(tmp_path, "run", **settings)
    before = {p: p.read_bytes() for p in sorted(first.out.rglob("*")) if p.is_file()}

    with pytest.raises(UserError, match="no adapter weights found"):  # it emptied the directory before
        train(tmp_path, "run", force=True, resume_adapter_file=str(tmp_path / "missing.safetensors"), **settings)
    reports = []

    class Interrupted:
        """mlx-lm's training callback, interrupted at the first training report (step 1; the first checkpoint is
        step 2)."""

        def on_val_loss_report(self, info):
            pass

        def on_train_loss_report(self, info):
            reports.append(info)
            raise KeyboardInterrupt

    spec_path = tmp_path / "run.aspec"
    options = TrainOptions(model=LLAMA, spec=str(spec_path), data=DATA, adapter_path=str(first.out), force=True,
                           learning_rate=1e-3, val_batches=2, **settings)  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        run(options, stream=io.StringIO(), training_callback=Interrupted())
    assert reports and {p: p.read_bytes() for p in sorted(first.out.rglob("*")) if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [], "no temporary directory left"

    with pytest.raises(UserError, match="not a readable safetensors file"):
        train(tmp_path, "new", resume_adapter_file=str(spec_path), **settings)  # a spec file, not weights
    assert not (tmp_path / "new").exists(), "a failed fresh run leaves no directory behind"

    again = train(tmp_path, "run", force=True, learning_rate=5e-3, **settings)
    assert [step for step, _ in list_checkpoints(again.out)] == [2, 4], "the first checkpoint replaced the old run"
    assert (again.out / "adapters.safetensors").read_bytes() != before[first.out / "adapters.safetensors"]


def test_format_duration():
    assert [format_duration(s) for s in (0, 7.4, 125, 3723, None)] == ["0:00", "0:07", "2:05", "1:02:03", "?"]


def test_example_data_is_what_its_script_writes(tmp_path):
    subprocess.run(
        [sys.executable, str(ROOT / "examples" / "data" / "make_data.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    for split in ("train", "valid", "test"):
        assert (tmp_path / f"{split}.jsonl").read_bytes() == (
            ROOT / "examples" / "data" / f"{split}.jsonl"
        ).read_bytes()


def test_a_diverged_run_is_refused_and_publishes_nothing(tmp_path):
    from adapterspec import apply
    from adapterspec.train.run import refuse_diverged

    model, _ = tiny.build("llama")
    apply(model, "layers[*].self_attn.q_proj: lora(r=2)")
    refuse_diverged(model, 3, tmp_path)  # finite adapters pass
    layer = model.model.layers[0].self_attn.q_proj
    layer.lora_b = mx.full(layer.lora_b.shape, float("nan"))
    with pytest.raises(UserError, match="diverged by step 3") as error:
        refuse_diverged(model, 3, tmp_path)
    assert error.value.exit_code == 1 and "q_proj.lora_b" in error.value.message


def test_training_switch_dora_on_experts_moves_a_b_and_m_and_reloads(tmp_path):
    moe = str(tiny.example_model_dir("tiny-moe"))
    spec = "adapterspec 1\nlayers[*].mlp.switch_mlp.*: dora(r=4, scale=2.0)\n"
    result = train(tmp_path, "moe", spec=spec, model=moe, iters=6, steps_per_eval=6, save_every=6, learning_rate=1e-2)
    (_, first), (_, last) = result.val_losses[0], result.val_losses[-1]
    assert last < first, result.val_losses
    saved = weights(result.out)
    fresh = load_model(moe)[0]
    plan = load_adapters(fresh, result.out)
    assert {e.adapter for e in plan.entries} == {"switch-dora"}
    initial = dict(tree_flatten(fresh.trainable_parameters()))
    for suffix in ("lora_a", "lora_b", "m"):
        names = [k for k in saved if k.endswith("." + suffix)]
        assert names and all(saved[k].ndim == (2 if suffix == "m" else 3) for k in names), suffix
    base_norms = {
        k: v for k, v in tree_flatten(load_model(moe)[0].parameters()) if k.endswith("switch_mlp.up_proj.weight")
    }
    for name, weight in base_norms.items():
        m = saved[name.replace(".weight", ".m")]
        assert not mx.allclose(m, mx.linalg.norm(weight.astype(mx.float32), axis=-1)).item(), "m did not train"
    assert all(mx.any(saved[k] != 0).item() for k in saved if k.endswith("lora_b"))
    assert initial.keys() == saved.keys()
    result.model.eval()
    assert mx.array_equal(fresh(a_batch()), result.model(a_batch())).item()


def test_memory_limit_holds_while_training_and_is_restored(tmp_path, capsys, monkeypatch):
    """--memory-limit 1GB: MLX's limit is 10⁹ bytes when the training loop starts, and what it was before once it
    ends; a size that is not one is a usage error."""
    from adapterspec.cli import main
    from adapterspec.train import loop

    seen = []
    original_fit = loop.fit

    def fit_noting_the_limit(*args, **kwargs):
        limit = mx.set_memory_limit(1 << 40)  # set_memory_limit answers the limit it replaces
        mx.set_memory_limit(limit)
        seen.append(limit)
        return original_fit(*args, **kwargs)

    monkeypatch.setattr("adapterspec.train.run.fit", fit_noting_the_limit)
    before = mx.set_memory_limit(1 << 40)
    mx.set_memory_limit(before)
    spec = tmp_path / "a.aspec"
    spec.write_text(ATTENTION)
    argv = ["train", LLAMA, str(spec), "--data", DATA, "--iters", "2", "--val-batches", "1", "--memory-limit", "1GB"]
    assert main([*argv, "-o", str(tmp_path / "out")]) == 0, capsys.readouterr().err
    after = mx.set_memory_limit(1 << 40)
    mx.set_memory_limit(after)
    assert seen == [10**9]
    assert after == before != 10**9
    assert main(["train", LLAMA, str(spec), "--data", DATA, "--memory-limit", "lots", "-o", str(tmp_path / "b")]) == 2

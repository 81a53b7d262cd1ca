"""fastopt.optim.AdamW in the frameworks users put it in: Hugging Face transformers' Trainer,
Lightning, accelerate, and fastopt's AGC against timm's.

The frameworks are not test dependencies of the main suite: each part skips, with the reason,
when its framework is absent. ``make test-integrations`` installs them from the registry into
``.venv-integrations`` (tests/integrations/requirements.txt, torch pinned by constraints.txt) and
runs this file. Nothing is downloaded: models are built from configs.

The README's section on the frameworks is tests/integrations/README-section.md: its ``py``
snippets are executed here as written (with test settings injected into the frameworks' own
classes: few steps, CPU, no logging), and ``test_readme_section_is_the_tested_one`` checks that
README.md carries the same text once it has the section.

Comparisons with torch run fastopt on its ``torch`` backend (torch's formulas, bit for bit) so
that they can be tight: a transformer's zero-gradient params (attention key biases) follow
rounding noise, which any other rounding moves by up to ~lr a step.
"""

from __future__ import annotations

import functools
import importlib.util
import pathlib
import re

import pytest
import torch

import fastopt

HERE = pathlib.Path(__file__).resolve().parent
SECTION = HERE / "integrations" / "README-section.md"
README = HERE.parent / "README.md"
SNIPPETS = re.findall(r"```py\n(.*?)```", SECTION.read_text(), flags=re.S)
HF_OPTIMIZER, HF_CLASS_AND_KWARGS, LIGHTNING, ACCELERATE = SNIPPETS
TIGHT = {"rtol": 1e-6, "atol": 1e-7}


def test_readme_section_is_the_tested_one():
    heading = SECTION.read_text().splitlines()[0]
    readme = README.read_text()
    assert heading in readme, f"README.md has no {heading!r} section (its text: tests/integrations/README-section.md)"
    assert SECTION.read_text().strip() in readme, "README.md's section differs from tests/integrations/README-section.md"


def run_snippet(code: str, **names) -> dict:
    namespace = {"__name__": "readme_snippet", **names}
    exec(compile(code, str(SECTION), "exec"), namespace)
    return namespace


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, **close) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        if close:
            torch.testing.assert_close(x, y, **close, msg=lambda m, name=name: f"{name}: {m}")
        else:
            assert torch.equal(x, y), name


# --------------------------------------------------------------------------- Hugging Face Trainer


@pytest.fixture
def transformers():
    module = pytest.importorskip("transformers", reason="transformers is not installed (make test-integrations)")
    pytest.importorskip("accelerate", reason="accelerate is not installed (make test-integrations)")
    yield module
    reset_accelerate()


def reset_accelerate():
    """Trainer and Accelerator keep a process-wide state (mixed precision among it): a fresh one."""
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(True)
    PartialState._reset_state()


def tiny_gpt2(transformers):
    """A 2-layer GPT-2 from a config: no download, a few thousand params."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2, bos_token_id=0,
                                     eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # no dropout: runs compare
    return transformers.GPT2LMHeadModel(config)


def token_dataset(count=16, length=12):
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 64, (count, length), generator=generator)
    return [{"input_ids": row, "labels": row} for row in ids]


def training_args(transformers, tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3,
        lr_scheduler_type="constant", weight_decay=0.01, max_grad_norm=1.0, use_cpu=True, seed=0, data_seed=0,
        report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    settings.update(overrides)
    return transformers.TrainingArguments(**settings)


def train_with(transformers, tmp_path, *, optimizer=None, cls_and_kwargs=None, **overrides):
    model = tiny_gpt2(transformers)
    args = training_args(transformers, tmp_path / "run", **overrides)
    kwargs = {"optimizers": (optimizer(model), None)} if optimizer else {"optimizer_cls_and_kwargs": cls_and_kwargs}
    trainer = transformers.Trainer(model=model, args=args, train_dataset=token_dataset(), **kwargs)
    trainer.train()
    return model, trainer


def torch_adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, foreach=False)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_hf_trainer_optimizers_with_trainers_clipping_equals_torch(transformers, tmp_path, precision):
    """The README's snippet: ``optimizers=(fastopt AdamW, None)``, Trainer clips (max_grad_norm=1.0);
    bf16 autocast and gradient accumulation as Trainer does them; the same weights as torch's AdamW."""
    overrides = {"bf16": precision == "bf16", "gradient_accumulation_steps": 2}
    model = tiny_gpt2(transformers)
    args = training_args(transformers, tmp_path / "fastopt", **overrides)
    with fastopt.use_backend("torch"):
        namespace = run_snippet(HF_OPTIMIZER, model=model, args=args, train_dataset=token_dataset())
    optimizer = namespace["optimizer"]
    assert isinstance(namespace["trainer"].optimizer.optimizer, fastopt.optim.AdamW)  # accelerate wraps it
    assert optimizer.state[next(model.parameters())]["step"].item() == 4
    expected, _ = train_with(transformers, tmp_path, optimizer=torch_adamw, **overrides)
    assert_same_weights(model, expected, **TIGHT)


def test_hf_trainer_class_and_kwargs_with_in_step_clipping(transformers, tmp_path):
    """The README's snippet: ``optimizer_cls_and_kwargs`` with ``max_grad_norm`` inside the step and
    Trainer's clipping off, against torch's AdamW with Trainer's clipping. Trainer groups the params
    (decay, then no decay), so the in-step norm sums in another order than Trainer's
    clip_grad_norm_(model.parameters()): equal within fp32 rounding, not bit for bit (README)."""
    model = tiny_gpt2(transformers)
    args = training_args(transformers, tmp_path / "fastopt", max_grad_norm=0.0)
    with fastopt.use_backend("torch"):
        namespace = run_snippet(
            "import fastopt\nfrom transformers import Trainer\n" + HF_CLASS_AND_KWARGS,
            model=model, args=args, train_dataset=token_dataset(),
        )  # fmt: skip
    optimizer = namespace["trainer"].optimizer.optimizer
    assert isinstance(optimizer, fastopt.optim.AdamW) and len(optimizer.param_groups) == 2  # decay / no decay
    assert optimizer.max_grad_norm == 1.0 and optimizer.stats["clip_coef"].item() < 1.0  # it clipped
    expected, _ = train_with(
        transformers, tmp_path, cls_and_kwargs=(torch.optim.AdamW, {"lr": 1e-3, "foreach": False}), max_grad_norm=1.0
    )
    assert_same_weights(model, expected, rtol=1e-5, atol=1e-6)


def test_hf_trainer_resume_from_checkpoint_gives_the_same_weights(transformers, tmp_path):
    """Trainer saves fastopt's optimizer state (torch's layout) at step 2; a new Trainer resumed
    from it ends bit for bit where the uninterrupted run does (in-step clipping, the default
    backend)."""
    cls_and_kwargs = (fastopt.optim.AdamW, {"lr": 1e-3, "max_grad_norm": 0.5})
    settings = {"max_grad_norm": 0.0, "save_strategy": "steps", "save_steps": 2}
    full, _ = train_with(transformers, tmp_path, cls_and_kwargs=cls_and_kwargs, **settings)
    model = tiny_gpt2(transformers)
    args = training_args(transformers, tmp_path / "run", **settings)
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=token_dataset(), optimizer_cls_and_kwargs=cls_and_kwargs
    )
    trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert trainer.optimizer.optimizer.max_grad_norm == 0.5
    assert_same_weights(model, full)


# --------------------------------------------------------------------------- accelerate


def test_accelerate_snippet_runs_and_equals_torch(transformers):
    from torch.utils.data import DataLoader

    model, torch_model = tiny_gpt2(transformers), tiny_gpt2(transformers)
    dataloader = DataLoader(token_dataset(8), batch_size=4)
    with fastopt.use_backend("torch"):
        namespace = run_snippet(ACCELERATE, model=model, dataloader=dataloader)
    assert namespace["optimizer"].optimizer.state  # it stepped

    from accelerate import Accelerator

    reset_accelerate()
    accelerator = Accelerator(mixed_precision="bf16")
    optimizer = torch.optim.AdamW(torch_model.parameters(), lr=1e-3, foreach=False)
    torch_model, optimizer, torch_loader = accelerator.prepare(torch_model, optimizer, DataLoader(token_dataset(8), batch_size=4))
    for batch in torch_loader:
        accelerator.backward(torch_model(**batch).loss)
        accelerator.clip_grad_norm_(torch_model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    assert_same_weights(namespace["model"], torch_model, **TIGHT)


# --------------------------------------------------------------------------- Lightning


@pytest.fixture
def lightning(monkeypatch, tmp_path):
    module = pytest.importorskip("lightning", reason="lightning is not installed (make test-integrations)")
    monkeypatch.chdir(tmp_path)  # Lightning writes lightning_logs/ and checkpoints under the working directory
    return module


def lit_model_class(lightning, make_optimizer=None, base=None):
    """A small regression module; configure_optimizers from ``base`` (the README's LitModel) or
    ``make_optimizer``."""

    class Lit(base or lightning.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))

        def training_step(self, batch, batch_index):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x).float(), y) * 100  # grads large enough to clip

        if make_optimizer is not None:

            def configure_optimizers(self):
                return make_optimizer(self.parameters())

    return Lit


def lit_data():
    generator = torch.Generator().manual_seed(5)
    # Two batches an epoch: a checkpoint after step 2 is at an epoch boundary, where Lightning resumes
    # exactly (mid-epoch it would replay the epoch from its first batch).
    dataset = torch.utils.data.TensorDataset(torch.randn(16, 8, generator=generator), torch.randn(16, 1, generator=generator))
    return torch.utils.data.DataLoader(dataset, batch_size=8)


QUIET = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
             enable_model_summary=False)  # fmt: skip


def fit(lightning, model, max_steps=4, ckpt_path=None, **trainer_kwargs):
    trainer = lightning.Trainer(max_steps=max_steps, **{**QUIET, **trainer_kwargs})
    trainer.fit(model, lit_data(), ckpt_path=ckpt_path)
    return trainer


def lit_torch_adamw(params):
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, foreach=False)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_lightning_snippet_with_gradient_clip_val_equals_torch(lightning, monkeypatch, precision):
    """The README's snippet (bf16-mixed with gradient_clip_val, which Lightning refused while the
    optimizer always declared ``_step_supports_amp_scaling``), and fp32; the same weights as torch's."""
    monkeypatch.setattr(lightning, "Trainer", functools.partial(lightning.Trainer, max_steps=4, **QUIET))
    code = LIGHTNING if precision == "bf16-mixed" else LIGHTNING.replace('precision="bf16-mixed"', f'precision="{precision}"')
    namespace = run_snippet(code)
    trainer = namespace["trainer"]
    model = lit_model_class(lightning, base=namespace["LitModel"])()
    with fastopt.use_backend("torch"):
        trainer.fit(model, lit_data())
    assert isinstance(trainer.optimizers[0], fastopt.optim.AdamW) and trainer.gradient_clip_val == 1.0
    assert trainer.global_step == 4
    expected = lit_model_class(lightning, lit_torch_adamw)()
    monkeypatch.undo()
    fit(lightning, expected, precision=precision, gradient_clip_val=1.0)
    assert_same_weights(model, expected, **TIGHT)


def test_lightning_refuses_framework_clipping_on_top_of_in_step_clipping(lightning):
    """With ``max_grad_norm`` the step takes the loss scale itself (``_step_supports_amp_scaling``),
    so Lightning refuses a second clipping, as for torch's fused AdamW: clip in one place."""
    model = lit_model_class(lightning, lambda params: fastopt.optim.AdamW(params, max_grad_norm=1.0))()
    with pytest.raises(RuntimeError, match="does not allow for gradient clipping"):
        fit(lightning, model, precision="bf16-mixed", gradient_clip_val=1.0)
    in_step = lit_model_class(lightning, lambda params: fastopt.optim.AdamW(params, max_grad_norm=1.0))()
    fit(lightning, in_step, precision="bf16-mixed")  # clipping in the step alone is fine


def test_lightning_16_mixed_on_cpu_is_bf16(lightning):
    """Lightning itself runs no fp16 on a CPU: ``precision="16-mixed"`` warns and becomes
    bf16-mixed, without a scaler (so the scaler test below passes the plugin explicitly)."""
    model = lit_model_class(lightning, lambda params: fastopt.optim.AdamW(params, lr=1e-3))()
    with pytest.warns(UserWarning, match="fp16 is not supported on CPU"):
        trainer = fit(lightning, model, precision="16-mixed", gradient_clip_val=1.0)
    assert trainer.precision_plugin.precision == "bf16-mixed" and trainer.precision_plugin.scaler is None


@pytest.mark.parametrize("scaler", ["torch", "fastopt"])
def test_lightning_fp16_with_a_grad_scaler(lightning, scaler):
    """fp16 autocast with a GradScaler on CPU, through Lightning's MixedPrecision plugin: with
    ``torch.amp.GradScaler`` and gradient_clip_val (Lightning unscales, clips, then the scaler
    steps), or with ``fastopt.amp.GradScaler`` and in-step clipping (the step unscales and checks
    for overflows itself); against torch's AdamW with torch's scaler and gradient_clip_val."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    def run(make_optimizer, scaler_cls, clip_val):
        model = lit_model_class(lightning, make_optimizer)()
        plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler_cls("cpu", init_scale=2.0**16))
        trainer = fit(lightning, model, plugins=[plugin], gradient_clip_val=clip_val)
        assert trainer.precision_plugin.scaler is plugin.scaler and trainer.global_step == 4
        return model

    with fastopt.use_backend("torch"):
        if scaler == "fastopt":
            make = functools.partial(fastopt.optim.AdamW, lr=1e-3, weight_decay=0.01, max_grad_norm=1.0)
            model = run(make, fastopt.amp.GradScaler, None)
        else:
            model = run(functools.partial(fastopt.optim.AdamW, lr=1e-3, weight_decay=0.01), torch.amp.GradScaler, 1.0)
    expected = run(lit_torch_adamw, torch.amp.GradScaler, 1.0)
    assert_same_weights(model, expected, rtol=1e-5, atol=1e-6)


def test_lightning_checkpoint_resume(lightning, tmp_path):
    """fit one epoch (2 steps), save, a new Trainer resumes from the checkpoint for the second: bit
    for bit the uninterrupted run, fastopt's settings and spike-guard state included. (By epochs:
    a fit stopped by max_steps and resumed replays the first batch of the stopped epoch once more
    in Lightning 2.6, for torch's AdamW as for fastopt's.)"""

    def make(params):
        return fastopt.optim.AdamW(params, lr=1e-3, max_grad_norm=1.0, spike_guard=50.0, spike_warmup=1)

    full = lit_model_class(lightning, make)()
    fit(lightning, full, max_steps=-1, max_epochs=2)
    first = lit_model_class(lightning, make)()
    trainer = fit(lightning, first, max_steps=-1, max_epochs=1)
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    resumed = lit_model_class(lightning, make)()
    trainer = fit(lightning, resumed, max_steps=-1, max_epochs=2, ckpt_path=str(tmp_path / "half.ckpt"))
    assert trainer.optimizers[0].max_grad_norm == 1.0 and trainer.optimizers[0].spike_guard == 50.0
    assert trainer.global_step == 4
    assert trainer.optimizers[0].spike_state["accepted"].item() == 4
    assert_same_weights(resumed, full)


# --------------------------------------------------------------------------- timm's AGC


def timm_adaptive_clip_grad():
    """timm's ``adaptive_clip_grad``. ``import timm`` imports torchvision, and the registry's
    torchvision is built against torch's CUDA release: against the CPU wheel its operators fail to
    register ("operator torchvision::nms does not exist"). So the lane installs timm without
    torchvision and, when ``import timm.utils.agc`` fails for that reason, loads timm's own
    ``timm/utils/agc.py`` (which imports only torch) from the installed package by its path."""
    spec = importlib.util.find_spec("timm")
    if spec is None:
        pytest.skip("timm is not installed (make test-integrations)")
    try:
        from timm.utils.agc import adaptive_clip_grad

        return adaptive_clip_grad
    except (ImportError, RuntimeError) as exc:  # torchvision absent, or built for another torch
        path = pathlib.Path(spec.submodule_search_locations[0]) / "utils" / "agc.py"
        if not path.exists():
            pytest.skip(f"timm imports fail ({exc}) and {path} is absent")
        module_spec = importlib.util.spec_from_file_location("timm_utils_agc", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return module.adaptive_clip_grad


def conv_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3), torch.nn.Flatten(), torch.nn.Linear(64, 5)
    )


def conv_loss(model, step):
    generator = torch.Generator().manual_seed(step)
    x = torch.randn(4, 3, 8, 8, generator=generator)
    return model(x).pow(2).mean() * 50


@pytest.mark.parametrize("clip_factor", [0.01, 0.1])
def test_agc_equals_timms(clip_factor):
    adaptive_clip_grad = timm_adaptive_clip_grad()
    ours, theirs = conv_net(), conv_net()
    for model in (ours, theirs):
        conv_loss(model, 0).backward()
    fastopt.adaptive_clip_grad_(ours.parameters(), clip_factor)
    adaptive_clip_grad(theirs.parameters(), clip_factor)
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-8, msg=name)


def test_in_step_agc_equals_timms_agc_then_torchs_adamw():
    adaptive_clip_grad = timm_adaptive_clip_grad()
    ours, theirs = conv_net(), conv_net()
    optimizer = fastopt.optim.AdamW(ours.parameters(), lr=1e-2, agc_clip_factor=0.02)
    torch_optimizer = torch.optim.AdamW(theirs.parameters(), lr=1e-2, foreach=False)
    for step in range(4):
        for model, opt in ((ours, optimizer), (theirs, torch_optimizer)):
            opt.zero_grad()
            conv_loss(model, step).backward()
            if opt is torch_optimizer:
                adaptive_clip_grad(model.parameters(), 0.02)
            opt.step()
    assert_same_weights(ours, theirs, rtol=1e-5, atol=1e-6)

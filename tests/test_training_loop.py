"""utils.training.train_loop, the loop both trainers run, on a toy model, and the read-only configuration."""

import json

import pytest
import torch

from utils.cli import RunFailed
from utils.presets import Config, resolve_preset
from utils.training import checkpoints, optimise, start_run, train_loader, train_loop


def toy_run(output_dir, max_steps, loss_at=lambda step, loss: loss, resume_from=None, heldout=None):
    """A linear model on 12 points, batch 4 (3 steps per epoch), through the real loop."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, project_dir=str(output_dir))
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(12, 3), torch.randn(12, 1))
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    loader = train_loader(data, 4, seed=0)
    model, optimizer, schedule, loader = accelerator.prepare(model, optimizer, schedule, loader)
    step, metrics = start_run(accelerator, output_dir, resume_from, seed=0)
    validated = []

    def train_step(batch, step):
        x, y = batch
        loss = loss_at(step, torch.nn.functional.mse_loss(model(x), y))
        optimise(accelerator, loss, model.parameters(), optimizer, schedule, max_grad_norm=1.0)
        return {"loss": loss}

    def validate(step):
        validated.append(step)
        return f"validated at {step}"

    last = train_loop(accelerator, loader, train_step, modules=[model], lr_scheduler=schedule, metrics=metrics,
                      output_dir=output_dir, start_step=step, max_steps=max_steps, steps_per_epoch=3,
                      gradient_accumulation_steps=1, checkpointing_steps=2, checkpoints_total_limit=2,
                      validation_steps=3, validate=validate, curve_keys=["loss"], desc="toy", heldout_steps=2,
                      heldout=heldout)
    return last, validated, model


def logged_steps(output_dir):
    return [json.loads(line)["step"] for line in (output_dir / "logs/metrics.jsonl").read_text().splitlines()]


def test_loop_logs_checkpoints_validates_and_resumes(tmp_path):
    last, validated, straight = toy_run(tmp_path / "a", max_steps=7)
    assert last == 7 and validated == [3, 6, 7]
    assert logged_steps(tmp_path / "a") == list(range(1, 8))
    assert [p.name for p in checkpoints(tmp_path / "a")] == ["checkpoint-000006", "checkpoint-000007"]  # limit 2
    assert (tmp_path / "a/logs/curves.png").is_file()

    toy_run(tmp_path / "b", max_steps=4)  # stops inside the second epoch
    _, validated, resumed = toy_run(tmp_path / "b", max_steps=7, resume_from=checkpoints(tmp_path / "b")[-1])
    assert validated == [6, 7] and logged_steps(tmp_path / "b") == list(range(1, 8))
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_the_heldout_hook_is_logged_and_can_stop_the_run(tmp_path):
    asked = []

    def heldout(step):
        asked.append(step)
        return {"heldout_loss": 10.0 - step}, step >= 4

    last, validated, _ = toy_run(tmp_path, max_steps=9, heldout=heldout)
    assert last == 4 and asked == [2, 4] and validated == [3]
    records = [json.loads(line) for line in (tmp_path / "logs/metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["heldout_loss"]) for r in records if "heldout_loss" in r] == [(2, 8.0), (4, 6.0)]
    assert checkpoints(tmp_path)[-1].name == "checkpoint-000004"  # the stop is a resumable state


def test_a_non_finite_loss_stops_with_the_step_and_the_last_checkpoint(tmp_path):
    with pytest.raises(RunFailed, match=r"loss became nan at step 4; the last good checkpoint is .*checkpoint-000004"):
        toy_run(tmp_path, max_steps=7, loss_at=lambda step, loss: loss * float("nan") if step == 4 else loss)
    assert logged_steps(tmp_path) == [1, 2, 3, 4]


def test_resolved_configuration_is_read_only_and_keeps_the_users_values():
    values, decided = resolve_preset("vae", "tiny", {"batch_size": 2, "resolution": None})
    assert values["batch_size"] == 2 and values["resolution"] == 32 and values["block_out_channels"] == [8, 16]
    assert "resolution" in decided and "batch_size" not in decided
    config = Config(values)
    assert config.pick("batch_size", "resolution") == {"batch_size": 2, "resolution": 32}
    with pytest.raises(AttributeError, match="read-only"):
        config.batch_size = 8
    with pytest.raises(AttributeError, match="no setting"):
        config.not_a_setting

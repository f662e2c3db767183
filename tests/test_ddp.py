"""Layer skipping under DDP (2 gloo processes): rank-identical plans, identical parameters."""

import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from sts_train.adapters import model_parts
from sts_train.factory import build_model
from sts_train.schedule import Schedule, sample_skipped_layers
from sts_train.skipper import LayerSkipper

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

STEPS, SEED = 4, 3
SCHEDULE = Schedule.from_dict({"schema_version": 1, "stages": [{
    "name": "instruction",
    "layers": {"policy": "per_layer", "skip_prob": [0.6, 0.6], "decay": "constant", "never_skip": []},
}]})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data():
    g = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.ones(4, 1, dtype=torch.long), torch.full((4, 16), 4),
                     torch.randint(10, 500, (4, 8), generator=g)], 1)
    labels = ids.clone()
    labels[:, :20] = -100
    return ids, labels, torch.randn(4, 3, 56, 56, generator=g)


def _plans():
    return [sample_skipped_layers(SCHEDULE.plan(s, num_layers=2, stage="instruction", total_steps=STEPS).skip_prob,
                                  seed=SEED, step=s) for s in range(STEPS)]


def _model():
    model = build_model("test", seed=0)
    model.config.use_cache = model.config.text_config.use_cache = False
    model.model.vision_tower.requires_grad_(False)
    return model.train()


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    model = _model()
    skipper = LayerSkipper(model_parts(model).decoder_layers)
    ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids, labels, pixels = _data()
    half = slice(2 * rank, 2 * rank + 2)
    grads_none = []
    for step, skipped in enumerate(_plans()):
        skipper.set_skipped(skipped)  # computed locally: no communication
        opt.zero_grad(set_to_none=True)
        out = ddp(input_ids=ids[half], attention_mask=torch.ones_like(ids[half]), labels=labels[half],
                  pixel_values=pixels[half])
        out.loss.backward()
        grads_none.append([all(p.grad is None for p in model_parts(model).decoder_layers[i].parameters())
                           for i in range(2)])
        opt.step()
    torch.save({"state": model.state_dict(), "grads_none": grads_none}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_ddp_skipping_ranks_identical_and_equal_to_single_process(tmp_path):
    plans = _plans()
    assert any(plans) and any(len(p) < 2 for p in plans)  # some skipping, some layers running
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for key in r0["state"]:
        assert torch.equal(r0["state"][key], r1["state"][key]), key
    expected_none = [[i in p for i in range(2)] for p in plans]
    assert r0["grads_none"] == r1["grads_none"] == expected_none

    # reference without DDP: DDP averages the two ranks' mean losses, so use the mean of halves
    model = _model()
    skipper = LayerSkipper(model_parts(model).decoder_layers)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids, labels, pixels = _data()
    for skipped in plans:
        skipper.set_skipped(skipped)
        opt.zero_grad(set_to_none=True)
        loss = sum(model(input_ids=ids[h], attention_mask=torch.ones_like(ids[h]), labels=labels[h],
                         pixel_values=pixels[h]).loss for h in (slice(0, 2), slice(2, 4))) / 2
        loss.backward()
        opt.step()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(r0["state"][key], value, rtol=1e-5, atol=1e-6, msg=key)


def _torchrun(tmp_path, cfg: dict, timeout: int) -> None:
    """``sts-train train`` on ``cfg`` under torchrun with 2 CPU processes; it must succeed."""
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
         str(_free_port()), "-m", "sts_train.cli", "train", str(tmp_path / "run.yaml")],
        capture_output=True, text=True, timeout=timeout, env=env)
    assert res.returncode == 0, res.stderr[-3000:]


def test_sts_train_under_torchrun(tmp_path, shapes_dir):
    import json

    sched = tmp_path / "schedule.yaml"
    sched.write_text(yaml.safe_dump(SCHEDULE.to_dict()))
    # 3 held-out samples, one eval sample per rank and batch: rank 1's second batch repeats
    # sample 0 (DDP pads), and the middle sample keeps one of its five answers
    held = json.loads(shapes_dir["instruction_eval"].read_text())[:3]
    held[1]["conversations"], held[1]["kinds"] = held[1]["conversations"][:2], held[1]["kinds"][:1]
    (tmp_path / "held_out.json").write_text(json.dumps(held))
    cfg = {
        "model": {"size": "test"},
        "data": {"json": str(shapes_dir["instruction"]), "images": str(shapes_dir["images"].parent),
                 "eval_json": str(tmp_path / "held_out.json"), "eval_images": str(shapes_dir["images"].parent)},
        "stage": {"name": "instruction"},
        "schedule": {"path": str(sched), "stage": "instruction"},
        "training": {"max_steps": 3, "per_device_train_batch_size": 2, "per_device_eval_batch_size": 1,
                     "save_steps": 3, "logging_steps": 1, "seed": SEED, "report_to": [],
                     "gradient_checkpointing": True},
        "output_dir": str(tmp_path / "run"),
    }
    _torchrun(tmp_path, cfg, timeout=300)
    log = (tmp_path / "run" / "sts_log.jsonl").read_text().splitlines()
    assert len(log) == 3  # rank 0 alone writes
    assert (tmp_path / "run" / "checkpoint-3" / "model.safetensors").is_file()

    state = json.loads((tmp_path / "run" / "checkpoint-3" / "trainer_state.json").read_text())
    # 2 ranks x batch 2 over 20 samples: 3 steps are 0.6 epochs (one process would be at 0.3)
    assert state["log_history"][-1]["epoch"] == pytest.approx(0.6)
    args = yaml.safe_load((tmp_path / "run" / "sts_run.yaml").read_text())
    assert args["training"]["gradient_checkpointing"] is True
    # the eval loss over both ranks is the single-process loss over every answer token once
    from sts_train.evaluate import evaluate_folder

    summary = json.loads((tmp_path / "run" / "sts_summary.json").read_text())
    single = evaluate_folder(tmp_path / "run" / "checkpoint-3", tmp_path / "held_out.json",
                             shapes_dir["images"].parent, accuracy=False)
    assert summary["eval_loss"] == pytest.approx(single["eval_loss"], rel=1e-5)


def test_text_only_micro_batch_under_torchrun(tmp_path, shapes_dir):
    """Dense, gradient checkpointing on, one image sample and one text-only sample, one per
    rank and step: the text-only rank never calls the projector. DDP must be told to look for
    unused parameters (the Trainer turns that off under gradient checkpointing), or it stops."""
    import json

    samples = json.loads(shapes_dir["instruction"].read_text())
    pair = [next(s for s in samples if "image" in s), next(s for s in samples if "image" not in s)]
    (tmp_path / "pair.json").write_text(json.dumps(pair))
    cfg = {
        "model": {"size": "test"},
        "data": {"json": str(tmp_path / "pair.json"), "images": str(shapes_dir["images"].parent)},
        "stage": {"name": "instruction"},
        "training": {"max_steps": 3, "per_device_train_batch_size": 1, "save_steps": 3,
                     "logging_steps": 1, "seed": SEED, "report_to": [], "gradient_checkpointing": True},
        "output_dir": str(tmp_path / "run"),
    }
    _torchrun(tmp_path, cfg, timeout=120)  # without the fix DDP hangs
    assert (tmp_path / "run" / "checkpoint-3" / "model.safetensors").is_file()

"""Conversion on several worker threads: the same bytes as on one, bounded bytes in flight, failures raised whole."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import pytest

from shardproof.converter.api import convert
from shardproof.converter.bounded_pool import run_bounded
from shardproof.converter.errors import ShardproofError
from shardproof.converter.source import Source
from tests.helpers import random_checkpoint

SIZES = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=8, hidden_size=32, intermediate_size=64,
             num_hidden_layers=3, vocab_size=97)
CASES = [
    ("LlamaForCausalLM", "bfloat16", dict(dtype="float16", tp_size=4, pp_size=2)),
    ("LlamaForCausalLM", "float32", dict(dtype="bfloat16", tp_size=2, use_parallel_embedding=True)),
    ("Qwen2ForCausalLM", "bfloat16", dict(dtype="float16", tp_size=2, pp_size=3)),
    ("GemmaForCausalLM", "float32", dict(dtype="float16", tp_size=2)),
    ("Phi3ForCausalLM", "bfloat16", dict(dtype="float16", tp_size=2, pp_size=2)),
    ("MixtralForCausalLM", "bfloat16", dict(dtype="float16", tp_size=2, moe_ep_size=2, moe_tp_size=1)),
]


def digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("architecture, source_dtype, layout", CASES, ids=lambda c: str(c))
def test_every_worker_count_writes_the_same_bytes(architecture, source_dtype, layout, tmp_path):
    model = random_checkpoint(tmp_path / "hf", architecture, seed=3, dtype=source_dtype, shards=3, **SIZES)
    outputs = {workers: tmp_path / f"w{workers}" for workers in (1, 3, 8)}
    for workers, out in outputs.items():
        convert(model, out, workers=workers, **layout)
    assert digests(outputs[1]) == digests(outputs[3]) == digests(outputs[8])


def test_zero_workers_is_refused(tmp_path):
    model = random_checkpoint(tmp_path / "hf", "LlamaForCausalLM", seed=0, **SIZES)
    with pytest.raises(ShardproofError, match="--workers 0"):
        convert(model, tmp_path / "out", workers=0)
    assert not (tmp_path / "out").exists()


def test_a_failing_worker_fails_the_conversion_and_leaves_nothing(tmp_path, monkeypatch):
    model = random_checkpoint(tmp_path / "hf", "LlamaForCausalLM", seed=0, shards=2, **SIZES)

    def failing(read):
        def failing_read(self, name, *args):
            if name == "model.layers.1.mlp.up_proj.weight":
                raise ShardproofError(f"{name}: cannot read")
            return read(self, name, *args)
        return failing_read

    monkeypatch.setattr(Source, "load", failing(Source.load))  # the whole-tensor read
    monkeypatch.setattr(Source, "blocks", failing(Source.blocks))  # the streamed one (converter/row_stream.py)
    with pytest.raises(ShardproofError, match="up_proj.weight: cannot read"):
        convert(model, tmp_path / "out", tp_size=2, workers=4)
    assert list(tmp_path.iterdir()) == [model]


class Recorder:
    """Runs tasks (their cost in bytes) slowly, recording the most tasks and bytes in flight at once."""

    def __init__(self, fail: int | None = None):
        self.lock = threading.Lock()
        self.tasks = self.bytes = self.most_tasks = self.most_bytes = 0
        self.fail, self.started, self.done = fail, [], []

    def run(self, cost: int) -> None:
        with self.lock:
            self.started.append(cost)
            self.tasks, self.bytes = self.tasks + 1, self.bytes + cost
            self.most_tasks, self.most_bytes = max(self.most_tasks, self.tasks), max(self.most_bytes, self.bytes)
        time.sleep(0.01)
        with self.lock:
            self.tasks, self.bytes = self.tasks - 1, self.bytes - cost
        if cost == self.fail:
            raise ShardproofError("task failed")


def test_bytes_in_flight_stay_within_the_budget_and_a_larger_task_runs_alone():
    recorder = Recorder()
    costs = [10, 30, 30, 100, 10, 10, 10, 10, 5]
    run_bounded(costs, recorder.run, lambda c: c, workers=4, budget=60, done=recorder.done.append)
    assert sorted(recorder.done) == sorted(costs) and recorder.started == costs
    assert recorder.most_tasks == 4 and recorder.most_bytes == 100  # 100 alone; the rest never above 60


def test_the_first_failure_is_raised_after_the_running_tasks_end():
    recorder = Recorder(fail=7)
    with pytest.raises(ShardproofError, match="task failed"):
        run_bounded([1, 7] + [1] * 50, recorder.run, lambda c: c, workers=3, budget=100)
    assert recorder.tasks == 0 and len(recorder.started) < 52


def test_progress_reports_every_tensor_and_byte_once(tmp_path):
    model = random_checkpoint(tmp_path / "hf", "LlamaForCausalLM", seed=0, **SIZES)
    seen: list[tuple[str, int]] = []
    plan = convert(model, tmp_path / "out", tp_size=2, pp_size=2, workers=3, progress=lambda n, b: seen.append((n, b)))
    assert len(seen) == sum(len(r.tensors) for r in plan.ranks)
    assert sum(b for _, b in seen) == sum(r.nbytes for r in plan.ranks)


def test_an_interrupt_in_the_calling_thread_waits_for_the_running_tasks():
    recorder = Recorder()

    def interrupted(task: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_bounded([1] * 20, recorder.run, lambda c: c, workers=4, budget=100, done=interrupted)
    assert recorder.tasks == 0 and len(recorder.started) < 20

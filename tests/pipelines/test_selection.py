"""Evaluation during pretraining: `select: best` keeps the best step's weights (and its numbers), `final` the last
step's, and the best survives a stop and resume."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipelines import fewshot, models, pretrain, selection
from pipelines.data.stream import LoaderConfig
from pipelines.downstream import Measurement
from pipelines.loop import Hooks, LoopSpec, TrainingStopped, train_loop
from pipelines.metrics import infer, top1
from pipelines.runtime import Runtime
from tests.pipelines.tiny import as_shards

CPU = torch.device("cpu")
IN_PROCESS = Runtime(CPU, loader=LoaderConfig(workers=0), progress=False)
STEPS, FLIP, EVERY, CLASSES = 60, 30, 10, 4


def _images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % CLASSES
    images = np.clip(labels[:, None, None, None] * 60 + rng.integers(0, 30, (n, 32, 32, 3)), 0, 255)
    return images.astype(np.uint8), labels


VAL = _images(64, 1)  # held out: upstream validation
SHOTS_TRAIN, SHOTS_TEST = _images(16, 2), _images(32, 3)  # a downstream task for few-shot


class FlippedLabels:
    """Real streamed batches whose labels move to the next class from step `at` on: the model then learns the wrong
    classes, so its held-out top-1 peaks mid-training and falls towards zero."""

    def __init__(self, loader, at: int):
        self.loader, self.at = loader, at

    def batches(self, start_step: int = 0):
        for step, batch in enumerate(self.loader.batches(start_step), start=start_step):
            yield batch if step < self.at else replace(batch, labels=(batch.labels + 1) % CLASSES)

    def skipped(self, epoch: int) -> dict[str, int]:
        return self.loader.skipped(epoch)


class Recorded:
    """The test's probe: at each step, held-out top-1 of the classifier (the score selected on) and few-shot top-1
    on the pre-logit features (the numbers a point reports), with the weights they were measured on."""

    def __init__(self):
        self.val, self.shots, self.states = {}, {}, {}

    def measure(self, model: torch.nn.Module) -> tuple[float, dict[int, float]]:
        val = top1(infer(model, VAL[0], 32, CPU), VAL[1])
        (x, y), (x_test, y_test) = ((infer(model, im, 32, CPU, pre_logits=True), lab)
                                    for im, lab in (SHOTS_TRAIN, SHOTS_TEST))
        return val, fewshot.run(fewshot.FewshotConfig(shots=(1, 2), repeats=2), x, y, x_test, y_test, seed=0).top1

    def __call__(self, model: torch.nn.Module, step: int) -> float:
        self.val[step], self.shots[step] = self.measure(model)
        self.states[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return self.val[step]


class StopAt:
    """A stop poll that asks the loop to stop on its `n`th call (every `stop_check_every` = 5 steps)."""

    def __init__(self, n: int):
        self.calls, self.n = 0, n

    def __call__(self) -> bool:
        self.calls += 1
        return self.calls == self.n


def _train(select: str, probe: Recorded, checkpoints=None, rt: Runtime = IN_PROCESS) -> selection.Selector:
    """Pretrain ViT-Pico/4 on labels that flip at step FLIP, measured every EVERY steps; resumes from `checkpoints`."""
    torch.manual_seed(0)
    cfg = pretrain.PretrainConfig(steps=STEPS, batch_size=16, lr=2e-3, warmup_steps=2, eval_every=EVERY,
                                  select=select)
    model = models.build("ViT-Pico/4", CLASSES, 32)
    optimizer = pretrain.make_optimizer(cfg, model, CPU)
    scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)
    source = FlippedLabels(pretrain.training_source(cfg, as_shards(*_images(64, 0)), 32, rt), FLIP)
    spec = LoopSpec(steps=STEPS, batch_size=16, image_size=32, grad_clip=1.0, eval_every=EVERY)
    selector = selection.Selector(model, probe, cfg.selects_best)
    train_loop(model, source, spec, optimizer, scheduler, rt, Hooks(checkpoint_dir=checkpoints, select=selector))
    return selector


def test_select_best_keeps_the_peak_steps_weights_and_numbers_through_a_resume(tmp_path):
    probe = Recorded()
    with pytest.raises(TrainingStopped):  # stopped at step 35, after the peak: the best rides in the checkpoint
        _train("best", probe, tmp_path, IN_PROCESS.replace(should_stop=StopAt(7)))
    chosen = _train("best", probe, tmp_path).chosen  # a fresh selector, resumed from the checkpoint
    assert sorted(probe.val) == list(range(EVERY, STEPS + 1, EVERY))
    peak = max(probe.val, key=lambda step: (probe.val[step], -step))  # the first step of the best score
    assert probe.val[STEPS] < probe.val[peak] - 50 and peak <= FLIP  # the construction: it peaks, then falls
    assert (chosen.step, chosen.score) == (peak, probe.val[peak])
    assert all(torch.equal(chosen.state[k], v) for k, v in probe.states[peak].items())
    kept = models.build("ViT-Pico/4", CLASSES, 32)
    kept.load_state_dict(chosen.state)
    assert probe.measure(kept) == (probe.val[peak], probe.shots[peak])  # the peak step's few-shot numbers


def test_select_final_reports_the_last_step():
    probe = Recorded()
    chosen = _train("final", probe).chosen
    assert (chosen.step, chosen.score, chosen.state) == (STEPS, probe.val[STEPS], None)
    assert probe.val[STEPS] < max(probe.val.values())  # the same peaked run: final ignores the peak


@pytest.mark.parametrize("every, model", [({"eval_every": 2}, "ViT-Pico/4"),
                                          ({"eval_every_examples": 17}, "ViT-Pico/4"),  # 17 images: 2 batches of 16
                                          ({"eval_every": 2}, "BiT-R14-Pico")])
def test_pretrain_run_measures_every_eval_every_steps_and_saves_the_best_beside_the_weights(tmp_path, every, model):
    """... in checkpoints too; a BiT's weights are channels_last in training, saved as safetensors (contiguous)."""
    cfg = pretrain.PretrainConfig(steps=5, batch_size=16, lr=2e-3, warmup_steps=1, checkpoint_every=2, **every)
    probe = Recorded()
    result = pretrain.run(cfg, model, as_shards(*_images(64, 0)), CLASSES, 32, IN_PROCESS, out_dir=tmp_path,
                          probe=probe, hooks=Hooks(checkpoint_dir=tmp_path / "checkpoints"))
    assert sorted(probe.val) == [2, 4, 5] and cfg.selects_best  # and at the end; best: eval_every's default
    best = max(probe.val, key=lambda step: (probe.val[step], -step))
    assert result.chosen.step == best and result.selected_state is result.chosen.state
    saved = load_file(str(tmp_path / selection.BEST_FILE))
    assert all(torch.equal(saved[k], v) for k, v in probe.states[best].items())


def test_the_headline_is_the_first_tasks_5_shot_else_its_largest():
    found = [Measurement("fewshot", task, k, "top1", 10.0 * k + (task == "b")) for task in "ab" for k in (1, 5, 10)]
    assert selection.headline(found, (1, 5, 10), "a") == 50.0
    assert selection.headline([m for m in found if m.shots != 5], (1, 10), "a") == 100.0


def test_best_is_selected_only_among_steps_measured_during_training():
    assert not pretrain.PretrainConfig(steps=5).selects_best  # nothing measured: the last step, as without select
    assert not pretrain.PretrainConfig(steps=5, eval_every=2, select="final").selects_best
    assert pretrain.PretrainConfig(steps=5, eval_every=2).selects_best
    with pytest.raises(ValueError, match="eval_every must be a positive"):
        pretrain.PretrainConfig(steps=5, eval_every=0)


def test_a_step_is_chosen_on_a_minival_of_the_tasks_train_split_never_on_its_test_split(tmp_path, monkeypatch):
    """The probe's few-shot queries are a fixed minival carved from the task's train split and its k-shot sets come
    from the rest: the test split, on which the study's few-shot evaluation reports the chosen weights, is never
    read (chosen on it, the reported number was the maximum over steps of itself)."""
    from pipelines import downstream
    from pipelines.fewshot import FewshotConfig
    from tests.pipelines import glyph_task

    task = glyph_task.digit_task(tmp_path, 200, 100)
    rt = Runtime(CPU, cache_dir=tmp_path, loader=LoaderConfig(workers=0), progress=False)
    train, test = downstream.task_splits(task, tmp_path)
    read, real = [], downstream.features
    monkeypatch.setattr(downstream, "features", lambda m, split, *a, **k: read.append(split) or real(m, split, *a, **k))
    curves = []
    probe = selection.Probe(FewshotConfig(shots=(1, 5), repeats=2), (task,), as_shards(*VAL), "ViT-Femto/4", 32, rt,
                            lambda prefix, step, values: curves.append((prefix, step, values)))
    torch.manual_seed(0)
    score = probe(models.build("ViT-Femto/4", CLASSES, 32), 3)
    rest, held = selection.minival(train)
    assert len(held) == 20 and len(rest) == 180  # 10% of the 200 train images
    urls = {s.index.shard_url(i) for s in read for i in range(s.index.num_shards)}
    assert urls.isdisjoint(test.index.shard_url(i) for i in range(test.index.num_shards))  # the test split unread
    support, queries = read  # the draws' rows, then the minival
    assert set(queries.positions.tolist()) == set(held.positions.tolist())
    assert set(support.positions.tolist()) <= set(rest.positions.tolist())
    assert [c[0] for c in curves] == ["pretrain/val", "pretrain/minival_fewshot/digits"]
    assert score == curves[1][2]["5shot_top1"]

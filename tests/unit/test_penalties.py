"""The repetition penalty's saturation, decided on the host from the requests' penalties
(``penalties.saturates``): a batch of mild penalties leaves its passes over (batch, vocab) out, and
its numbers are those of the saturating passes bit for bit; a batch with one far penalty runs them."""

from collections import Counter
from collections.abc import Callable

import pytest
import torch
from torch.overrides import TorchFunctionMode

from dlora.common.messages import SamplingParams
from dlora.services.worker.engine import penalties, sampler
from dlora.services.worker.engine.penalties import LOGIT_BOUND, apply_penalties, apply_penalties_rows, saturates

MILD = (1.05, 1.3, 2.0, 0.5, 0.01, 1e-13, 4e13, 1 / penalties._MILD, penalties._MILD)
FAR = (1e-40, 1e-14, 1e14, 1e300)


def _logits(rows: int, vocab: int, seed: int) -> torch.Tensor:
    """Rows of every scale up to ``LOGIT_BOUND`` (a model's tens, fp16's largest, far past both),
    with a masked token, a zero, an infinity and a NaN among them."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([1.0, 30.0, 65504.0, 1e10, LOGIT_BOUND])[torch.arange(rows) % 5]
    x = (torch.randn(rows, vocab, generator=g) * scale[:, None]).clamp(-LOGIT_BOUND, LOGIT_BOUND)
    x[:, 0], x[:, 1], x[0, 2], x[1, 3] = float("-inf"), 0.0, float("inf"), float("nan")
    return x


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)  # NaN compared too, as bits


def _histories(rows: int) -> list[tuple[list[int], list[int]]]:
    return [([0, 1, 2, 3, 5 + i], [7, 9 + i, 9 + i]) for i in range(rows)]


def test_only_a_penalty_far_from_one_can_saturate() -> None:
    assert not any(saturates(p) for p in MILD) and all(saturates(p) for p in FAR)


@pytest.mark.parametrize("far", [False, True], ids=["mild", "one-far"])
def test_penalised_rows_are_bit_for_bit_those_of_the_saturating_passes(
    monkeypatch: pytest.MonkeyPatch, far: bool
) -> None:
    """Both branches, against the passes every batch ran before (``saturates`` always true): a
    batch of mild penalties (none saturated), and one with a far penalty beside them (all run)."""
    x, histories = _logits(10, 64, 0), _histories(10)
    chosen = [*MILD, 1e-40 if far else 1.2]
    params = [SamplingParams(repetition_penalty=p, presence_penalty=0.5 * (i % 2)) for i, p in enumerate(chosen)]
    rows = apply_penalties_rows(x, params, histories)
    ones = torch.stack([apply_penalties(x[i], p, *histories[i]) for i, p in enumerate(params)])
    with monkeypatch.context() as m:
        m.setattr(penalties, "saturates", lambda _penalty: True)
        want_rows = apply_penalties_rows(x, params, histories)
        want_ones = torch.stack([apply_penalties(x[i], p, *histories[i]) for i, p in enumerate(params)])
    assert torch.equal(_bits(rows), _bits(want_rows)) and torch.equal(_bits(ones), _bits(want_ones))


class _Calls(TorchFunctionMode):
    """The torch functions and tensor methods called inside it, by name (the profiler's own start
    costs seconds)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: Counter[str] = Counter()
        self.shapes: Counter[tuple[str, tuple[int, ...]]] = Counter()  # by the shape of what it is called on

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = getattr(func, "__name__", str(func))
        self.names[name] += 1
        if args and isinstance(args[0], torch.Tensor):
            self.shapes[name, tuple(args[0].shape)] += 1
        return func(*args, **(kwargs or {}))


def _calls(run: Callable[[], object]) -> _Calls:
    with _Calls() as calls:
        run()
    return calls


def _ops(run: Callable[[], object]) -> Counter[str]:
    return _calls(run).names


def test_a_batch_of_mild_penalties_runs_no_saturation_pass() -> None:
    """The saturation cost three (batch, vocab) passes (isfinite, clamp, where) at every step of a
    penalised batch, though only a penalty far from 1 can need it."""
    x, histories = _logits(4, 64, 1), _histories(4)
    mild = [SamplingParams(repetition_penalty=1.2)] * 4
    one_far = [*mild[:3], SamplingParams(repetition_penalty=1e-40)]
    assert _ops(lambda: apply_penalties_rows(x, mild, histories))["isfinite"] == 0
    assert _ops(lambda: apply_penalties_rows(x, one_far, histories))["isfinite"] == 1
    assert _ops(lambda: apply_penalties(x[0], mild[0], *histories[0]))["isfinite"] == 0


def test_penalised_rows_are_not_copied_before_they_are_penalised() -> None:
    """Every operation on them makes a new tensor: the copy taken first was a (batch, vocab) pass a
    step for nothing; the caller's logits stay as they were."""
    x, histories = _logits(4, 64, 2), _histories(4)
    before = x.clone()
    params = [SamplingParams(repetition_penalty=1.2, frequency_penalty=0.5)] * 4
    assert _ops(lambda: apply_penalties_rows(x, params, histories))["clone"] == 0
    assert torch.equal(_bits(x), _bits(before))


def test_a_batch_with_penalised_rows_reads_only_those_for_their_own_maximum() -> None:
    """Whether a row's logits were finite before its penalties took the maximum of the whole batch
    again, though an unpenalised row's is its peak: one (batch, vocab) reduction, not two."""
    x = _logits(8, 64, 3)
    params = [SamplingParams()] * 8
    params[1] = params[7] = SamplingParams(repetition_penalty=1.2)  # row 1's NaN: the model's, not the penalty's
    calls = _calls(lambda: sampler.launch_sample(x, params, [None] * 8, _histories(8)).result())
    assert calls.shapes["max", (8, 64)] + calls.shapes["amax", (8, 64)] == 1
    histories = _histories(8)
    alone = [sampler.sample(x[i : i + 1], [p], [None], [histories[i]])[0] for i, p in enumerate(params)]
    together = sampler.launch_sample(x, params, [None] * 8, histories).result()
    assert [str(t) for t in together] == [str(t) for t in alone]  # errors too (row 0: infinity)


def test_a_mild_row_has_the_same_numbers_beside_a_far_one_as_alone() -> None:
    """Saturation is each row's own (as ``apply_penalties`` decides it alone): a bf16 model's logit
    past ``LOGIT_BOUND`` (bf16 reaches float32's 3.4e38) in a mild row is scaled as it is, whether or
    not a far penalty shares its batch; before, the far row saturated its neighbour's too."""
    x = torch.full((2, 8), 1.0)
    x[0, 3] = float(torch.tensor(3e38, dtype=torch.bfloat16))  # seen, under 0.5: past float32 alone
    mild, far = SamplingParams(repetition_penalty=0.5), SamplingParams(repetition_penalty=1e-40)
    histories = [([3], []), ([3], [])]
    alone = apply_penalties_rows(x[:1], [mild], histories[:1])
    beside = apply_penalties_rows(x, [mild, far], histories)
    assert torch.equal(_bits(beside[0]), _bits(alone[0]))
    assert torch.equal(_bits(alone[0]), _bits(apply_penalties(x[0], mild, *histories[0])))
    assert beside[1, 3] == penalties._SATURATED  # the far row still saturates

"""The lr schedules of lfi_jax.optim against hand-worked values."""

import pytest

from lfi_jax.config import base_config, validate
from lfi_jax.errors import UserError
from lfi_jax.optim import schedule


def _optim(**kw):
    c = base_config().optim
    c.update(kw)
    return c

def test_step_schedule_drops_at_the_given_steps():
    # lr 1e-3, warm-up 10 steps, x0.1 at steps 50 and 80 (DETR's lr drop).
    lr = schedule(_optim(lr=1e-3, warmup_steps=10, schedule="step", drop_steps=(50, 80), drop_factor=0.1), 100)
    expect = {0: 0.0, 5: 5e-4, 10: 1e-3, 49: 1e-3, 50: 1e-4, 79: 1e-4, 80: 1e-5, 99: 1e-5}
    for step, want in expect.items():
        assert float(lr(step)) == pytest.approx(want, rel=1e-6, abs=1e-12), step

def test_step_schedule_without_warmup():
    lr = schedule(_optim(lr=2e-4, warmup_steps=0, schedule="step", drop_steps=(3,), drop_factor=0.5), 10)
    assert [round(float(lr(s)), 10) for s in range(5)] == [2e-4, 2e-4, 2e-4, 1e-4, 1e-4]

@pytest.mark.parametrize("drops", [(), (20, 10), (0,)])
def test_step_schedule_needs_increasing_positive_drop_steps(drops):
    c = base_config()
    c.optim.schedule = "step"
    c.optim.drop_steps = drops
    with pytest.raises(UserError, match="drop_steps"):
        validate(c)

def test_unknown_schedule_is_refused():
    c = base_config()
    c.optim.schedule = "linear"
    with pytest.raises(UserError, match="cosine, constant or step"):
        validate(c)

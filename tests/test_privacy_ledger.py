"""The persistent privacy ledger: cumulative epsilon, budget refusal, survival of restarts."""

import json
from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant

from shared.errors import (
    ConfigError,
    DataError,
    PrivacyBudgetExceededError,
    RoundCapExceededError,
)
from shared.privacy.ledger import RDP_ORDERS, PrivacyBudget, PrivacyLedger, Spend


def test_epsilon_is_cumulative_over_rounds_and_matches_one_accountant():
    ledger = PrivacyLedger(PrivacyBudget(epsilon=100, delta=1e-5))
    for _ in range(3):
        ledger.record(noise_multiplier=1.1, sample_rate=0.05, steps=20)
    ledger.record(noise_multiplier=0.9, sample_rate=0.05, steps=10)
    acc = RDPAccountant()
    acc.history = [(1.1, 0.05, 60), (0.9, 0.05, 10)]
    assert ledger.epsilon() == pytest.approx(acc.get_epsilon(1e-5, alphas=list(RDP_ORDERS)))
    one_round = PrivacyLedger(PrivacyBudget(100, 1e-5))
    one_round.record(1.1, 0.05, 20)
    assert ledger.epsilon() > one_round.epsilon() * 1.5  # a fresh engine per round resets


def test_survives_restart(tmp_path):
    path = tmp_path / "ledger.json"
    a = PrivacyLedger.open(path, PrivacyBudget(8, 1e-5))
    a.record(1.0, 0.1, 30)
    eps = a.epsilon()
    b = PrivacyLedger.open(path, PrivacyBudget(8, 1e-5))
    assert b.epsilon() == pytest.approx(eps)
    assert json.loads(path.read_text())["history"] == [[1.0, 0.1, 30]]


def test_budget_exceeded_declines_and_is_counted(tmp_path):
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger.open(path, PrivacyBudget(epsilon=1.0, delta=1e-5))
    big = Spend(noise_multiplier=0.5, sample_rate=1.0, steps=50)
    with pytest.raises(
        PrivacyBudgetExceededError,
        match=r"declines.*epsilon-budget.*privacy-epsilon.*noise-multiplier",
    ):
        ledger.check(big)
    assert ledger.epsilon() == 0.0  # nothing was spent
    assert PrivacyLedger.open(path, PrivacyBudget(1.0, 1e-5)).declined == 1


def test_a_spend_past_the_round_cap_declines_within_the_budget_and_spends_nothing(tmp_path):
    """The per-round cap bounds what one spend adds (epsilon after minus before, the
    prediction the budget check makes): past it the ledger declines (counted, as a budget
    decline is) and keeps its history, however much budget is left; at it the spend passes."""
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger.open(path, PrivacyBudget(epsilon=100.0, delta=1e-5))
    ledger.record(noise_multiplier=1.5, sample_rate=0.1, steps=10)
    on_disk = json.loads(path.read_text())["history"]
    greedy = Spend(noise_multiplier=0.7, sample_rate=1.0, steps=3)
    added = ledger.round_epsilon(greedy)
    assert added == pytest.approx(ledger.epsilon(extra=greedy) - ledger.epsilon())
    assert added > 6.0 and ledger.epsilon(extra=greedy) < 100.0  # within the budget
    with pytest.raises(RoundCapExceededError, match=r"max-round-epsilon 6; it declines") as err:
        ledger.check(greedy, max_round_epsilon=6.0)
    assert err.value.cap == "max-round-epsilon"
    assert "noise-multiplier" in str(err.value) and "--max-round-epsilon" in str(err.value)
    reopened = PrivacyLedger.open(path, PrivacyBudget(100.0, 1e-5))
    assert reopened.history == ledger.history and json.loads(path.read_text())["history"] == on_disk
    assert reopened.declined == 1
    ledger.check(greedy, max_round_epsilon=added)  # at the cap: no decline
    ledger.check(greedy)  # no cap: the budget alone


def test_the_budget_is_checked_before_the_round_cap(tmp_path):
    """A spend past both says it is past the budget (the decline the server knows)."""
    ledger = PrivacyLedger(PrivacyBudget(epsilon=1.0, delta=1e-5))
    with pytest.raises(PrivacyBudgetExceededError):
        ledger.check(Spend(0.5, 1.0, 50), max_round_epsilon=0.5)


def test_a_decline_stands_when_the_full_disk_has_no_room_for_its_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Saving the decline count on a full disk raised the OSError out of `check`: the client
    was reported as failed, not as declining for its budget. The budget's decision stands
    (a decline spends nothing, so the spent history on disk is unchanged); the count, mere
    bookkeeping, is kept in memory and the failure is logged on one line naming the file."""
    import errno
    import logging
    import os

    import shared.privacy.ledger as ledger_module

    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger.open(path, PrivacyBudget(epsilon=1.0, delta=1e-5))
    ledger.record(noise_multiplier=1.0, sample_rate=0.1, steps=10)
    spent, on_disk = ledger.epsilon(), path.read_text()

    def full_disk(target: Path, data: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))

    monkeypatch.setattr(ledger_module, "write_json_atomic", full_disk)
    with caplog.at_level(logging.WARNING), pytest.raises(PrivacyBudgetExceededError):
        ledger.check(Spend(noise_multiplier=0.5, sample_rate=1.0, steps=50))
    assert ledger.declined == 1 and ledger.epsilon() == spent
    assert path.read_text() == on_disk  # the spend is all there, never under-counted
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1 and str(path) in warning[0] and "No space left" in warning[0]
    assert "\n" not in warning[0]
    with pytest.raises(OSError):  # a spend whose record cannot be saved is still an error
        ledger.record(noise_multiplier=1.0, sample_rate=0.1, steps=1)


def test_exhausted_client_stays_exhausted_after_restart(tmp_path):
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger.open(path, PrivacyBudget(epsilon=2.0, delta=1e-5))
    ledger.record(0.6, 1.0, 20)
    assert ledger.exhausted
    again = PrivacyLedger.open(path, PrivacyBudget(epsilon=2.0, delta=1e-5))
    assert again.exhausted
    with pytest.raises(PrivacyBudgetExceededError):
        again.check(Spend(10.0, 0.01, 1))


def test_corrupt_ledger_is_refused_not_reset(tmp_path):
    path = tmp_path / "ledger.json"
    path.write_text("{not json")
    with pytest.raises(DataError, match="refusing to reset"):
        PrivacyLedger.open(path, PrivacyBudget())
    # every way a ledger can be unusable names the file and says it is never reset
    for state in (
        {"version": 1, "mechanism": "rdp", "history": [["x", 1, 2]]},
        {"version": 1, "mechanism": "rdp", "history": [[1.0, 0.5]]},
        {"version": 2, "mechanism": "rdp", "history": []},
        [1.0, 0.5, 3],
    ):
        path.write_text(json.dumps(state))
        with pytest.raises(DataError, match=rf"{path}.*restore it from backup.*never reset"):
            PrivacyLedger.open(path, PrivacyBudget())
    # numbers past a float (OverflowError) and JSON nested past the parser (RecursionError)
    # raised those instead of the typed error (a /status answered 500)
    for text in (
        '{"version": 1, "mechanism": "rdp", "history": [[1.0, 0.1, 1e400]]}',
        '{"version": 1, "mechanism": "rdp", "history": [], "declined": 1e400}',
        f'{{"version": 1, "mechanism": "rdp", "history": [[1.0, 0.1, {10**400}]]}}',
        '{"version": 1, "mechanism": "rdp", "history": ' + "[" * 100_000 + "]" * 100_000 + "}",
    ):
        path.write_text(text)
        with pytest.raises(DataError, match=rf"{path}.*(restore it from backup|refusing)"):
            PrivacyLedger.open(path, PrivacyBudget())


@pytest.mark.parametrize("steps", [2.9, 0.5, True, "7", -1])
def test_a_step_count_that_is_no_whole_number_is_refused_not_rounded_down(tmp_path, steps):
    """A step count read as int() (2.9 -> 2, 0.5 -> 0) forgot spent privacy: a ledger
    holding 0.5 steps reported epsilon 0. Only whole numbers >= 0 are a count."""
    path = tmp_path / "ledger.json"
    state = {"version": 1, "mechanism": "rdp", "history": [[1.5, 0.1, steps]], "declined": 0}
    path.write_text(json.dumps(state))
    with pytest.raises(DataError, match=rf"{path}.*restore it from backup.*never reset"):
        PrivacyLedger.open(path, PrivacyBudget())
    # a whole number written as a float (another JSON writer) is the same count
    state["history"] = [[1.5, 0.1, 3.0]]
    path.write_text(json.dumps(state))
    assert PrivacyLedger.open(path, PrivacyBudget()).history == [Spend(1.5, 0.1, 3)]


@pytest.mark.parametrize("kwargs", [{"epsilon": 0}, {"delta": 1.5}, {"epsilon": float("inf")}])
def test_bad_budget(kwargs):
    with pytest.raises(ConfigError):
        PrivacyBudget(**kwargs)


def test_bad_spend():
    with pytest.raises(ConfigError):
        Spend(0.0, 0.1, 1)
    with pytest.raises(ConfigError):
        Spend(1.0, 1.5, 1)


@pytest.mark.parametrize("q", [1e-4, 0.003, 0.0625, 0.5, 0.999, 1.0])
@pytest.mark.parametrize("sigma", [0.3, 1.0, 1.5, 20.0])
def test_vectorized_rdp_equals_opacus_series(q, sigma):
    import numpy as np
    from opacus.accountants.analysis.rdp import compute_rdp

    from shared.privacy.ledger import _rdp_per_step

    ours = _rdp_per_step(sigma, q)
    ref = np.asarray(compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=RDP_ORDERS))
    assert np.array_equal(np.isfinite(ours), np.isfinite(ref))
    assert np.allclose(ours, ref, rtol=1e-5, atol=0)

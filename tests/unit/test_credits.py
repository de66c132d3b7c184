import pytest

from dlora.services.worker.policy.credits import CreditLedger


def test_transfer_moves_seconds_from_payers_to_displaced() -> None:
    c = CreditLedger()
    c.transfer({"b", "c"}, {"a": 1.0}, seconds=0.5)
    assert (c["a"], c["b"], c["c"]) == (-1.0, 0.5, 0.5)
    c.transfer({"a"}, {"b": 3.0, "c": 1.0}, seconds=0.4)
    assert c["b"] == pytest.approx(0.2) and c["c"] == pytest.approx(0.4) and c["a"] == pytest.approx(-0.6)
    assert c.total() == pytest.approx(0.0)


def test_payer_is_never_paid_and_empty_sides_move_nothing() -> None:
    c = CreditLedger()
    c.transfer({"a", "b"}, {"a": 1.0}, seconds=1.0)
    assert (c["a"], c["b"]) == (-1.0, 1.0)
    c.transfer({"x"}, {}, seconds=1.0)
    c.transfer(set(), {"a": 1.0}, seconds=1.0)
    assert c["x"] == 0.0 and c["a"] == -1.0


def test_settle_repays_debtors_in_proportion_and_never_past_zero() -> None:
    c = CreditLedger({"owed": 3.0, "small": 1.0, "d1": -3.0, "d2": -1.0})
    c.settle("owed")
    assert c["owed"] == 0.0
    assert c["d1"] == pytest.approx(-0.75) and c["d2"] == pytest.approx(-0.25)
    c.settle("small")
    assert c["d1"] == 0.0 and c["d2"] == 0.0 and c["small"] == 0.0
    assert c.total() == pytest.approx(0.0)


def test_settling_a_debtor_or_without_debtors_is_a_no_op() -> None:
    c = CreditLedger({"a": -1.0, "b": 1.0})
    c.settle("a")
    c.settle("nobody")
    assert (c["a"], c["b"]) == (-1.0, 1.0)


def test_dropping_a_key_keeps_the_total_and_crosses_no_one_past_zero() -> None:
    """A deleted adapter's balance stayed in the ledger for good (saved with every checkpoint); taken
    out, what it was owed is forgiven its debtors, what it owed cut from the others' credit."""
    c = CreditLedger({"gone@v1": 2.0, "d1": -3.0, "d2": -1.0})
    c.drop(["gone@v1", "never"])
    assert "gone@v1" not in c.balances and c["d1"] == pytest.approx(-1.5) and c["d2"] == pytest.approx(-0.5)
    c = CreditLedger({"owes@v1": -1.0, "a": 3.0, "b": 1.0, "c": -3.0})
    c.drop(["owes@v1"])
    assert (c["a"], c["b"], c["c"]) == (pytest.approx(2.25), pytest.approx(0.75), -3.0)
    assert c.total() == pytest.approx(0.0)
    c = CreditLedger({"x": 1.0, "y": -1.0})
    c.drop(["x"])
    assert not c.balances  # squared: gone
    c = CreditLedger({"x@v1": -1.0, "x@v2": 0.25, "y": 0.75})
    c.drop(["x@v1"], into="x@v2")  # a version replaced: its balance is the version's now
    assert dict(c.balances) == {"x@v2": -0.75, "y": 0.75}

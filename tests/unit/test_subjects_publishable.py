"""Which reply subjects a worker can publish to: the dispatcher refuses the others at the door."""

from dlora.common import subjects


def test_publishable_subjects() -> None:
    assert subjects.publishable("dlora.reply.app.r1")
    for bad in ("dlora.reply.app.r 1", "dlora..r1", "dlora.reply.app.", "dlora.*.r1", "dlora.>", "a\tb", ""):
        assert not subjects.publishable(bad), bad
    assert not subjects.replies_to("app", subjects.replies_prefix("app") + "r1 x")
    assert subjects.replies_to("app", subjects.replies_prefix("app") + "r1")

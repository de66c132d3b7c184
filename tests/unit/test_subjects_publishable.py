"""Which reply subjects a worker can publish to: the dispatcher refuses the others at the door."""

from dlora.common import subjects


def test_publishable_subjects() -> None:
    assert subjects.publishable("dlora.reply.app.r1")
    for bad in ("dlora.reply.app.r 1", "dlora..r1", "dlora.reply.app.", "dlora.*.r1", "dlora.>", "a\tb", ""):
        assert not subjects.publishable(bad), bad
    assert not subjects.replies_to("app", subjects.replies_prefix("app") + "r1 x")
    assert subjects.replies_to("app", subjects.replies_prefix("app") + "r1")


def test_a_moved_requests_kv_goes_on_a_subject_its_worker_reads_whatever_its_id() -> None:
    """A trial: an application's request id holding ".", "*", ">" or a space made its move's KV
    subject unsendable, or one no worker's inbox matched (the chunks name the request themselves)."""
    ids = ("a.b", "sp ace", ">", "*", "", "x" * 5000, "plain")
    made = {subjects.kv_transfer("w-0", rid) for rid in ids}
    assert len(made) == len(ids)  # one a request
    for subject in made:
        assert subjects.publishable(subject), subject
        head, _, token = subject.rpartition(".")
        assert head + ".*" == subjects.kv_inbox("w-0") and token.isalnum()


def test_an_application_owns_its_name_and_the_names_under_it() -> None:
    assert subjects.owns_client("app", "app") and subjects.owns_client("app", "app.worker-3")
    for other in ("apple", "bob", "bob.app", "", "app2.x"):
        assert not subjects.owns_client("app", other), other
    assert subjects.sender(subjects.clients_of("app")) == "app" and subjects.sender(subjects.CLIENTS) == ""

import re

import pytest

from kubetrail.core.acks import AckToken, OrderedAcks
from kubetrail.core.tags import expand_tag
from kubetrail.runtime.routing import TagMatcher


def test_token_completes_once_after_all_releases() -> None:
    results: list[bool] = []
    token = AckToken(results.append)
    token.retain(2)
    token.seal()
    token.release()
    assert results == []
    token.release(delivered=False)
    assert results == [False]
    with pytest.raises(RuntimeError):
        token.release()


def test_hooks_run_on_delivery_before_the_source_is_told_and_holds_delay_only_the_source() -> None:
    """on_complete hooks run when the last reference goes, before the source's callback; a hold
    delays the callback (and can turn it into "not delivered"), never the hooks."""
    calls: list[str] = []
    token = AckToken(lambda ok: calls.append(f"source {ok}"))
    token.on_complete(lambda ok: calls.append(f"hook {ok}"))
    token.hold()
    token.retain()
    token.seal()
    token.release(True)
    assert calls == ["hook True"], "the hold must not delay the hooks, only the source"
    token.unhold(False)
    assert calls == ["hook True", "source False"]
    with pytest.raises(RuntimeError):
        token.unhold()
    with pytest.raises(RuntimeError):
        token.on_complete(calls.append)

    failing = AckToken(lambda ok: calls.append(f"told {ok}"))

    def broken(ok: bool) -> None:
        raise ValueError("hook bug")

    failing.on_complete(broken)
    with pytest.raises(ValueError):
        failing.seal()
    assert calls[-1] == "told True", "a failing hook must not keep the source from being told"


def test_ordered_acks_only_advance_over_contiguous_completions() -> None:
    advanced: list[int] = []
    acks: OrderedAcks[int] = OrderedAcks(advanced.append)
    t1, t2, t3 = acks.token(100), acks.token(200), acks.token(300)
    for t in (t1, t2, t3):
        t.retain()
        t.seal()
    t3.release()
    t2.release()
    assert advanced == [] and len(acks) == 3
    t1.release()
    assert advanced == [300] and len(acks) == 0


@pytest.mark.parametrize(
    ("pattern", "tag", "hit"),
    [
        ("*", "anything.at.all", True),
        ("kube.*", "kube.var.log.a", True),
        ("kube.*", "kubex", False),
        ("a.*.c", "a.b.b.c", True),
        ("a.*.c", "a.b.d", False),
        ("exact", "exact", True),
        ("exact", "exact2", False),
    ],
)
def test_match_wildcards(pattern: str, tag: str, hit: bool) -> None:
    assert TagMatcher(pattern=pattern).matches(tag) is hit


def test_match_regex_is_searched() -> None:
    matcher = TagMatcher(regex=re.compile(r"_sensor_[AB]"))
    assert matcher.matches("x_sensor_A") and not matcher.matches("x_sensor_C")


def test_tail_tag_expansion() -> None:
    assert expand_tag("kube.*", "/var/log/containers/a_b_c.log") == "kube.var.log.containers.a_b_c.log"
    assert expand_tag("plain", "/x") == "plain"

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

"""The RP's destination policy (tm3/core/destinations.py), without sockets:
the built-in denials, the operator's rules in order, the own pipe port."""

from __future__ import annotations

import pytest

from tm3.core.destinations import BUILT_IN_DENIALS, BadRule, DestinationPolicy, parse_rule


def allowed(policy: DestinationPolicy, host: str, port: int = 80) -> bool:
    return policy.check(host, port).allowed


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "127.255.255.254",
        "0.0.0.0",
        "0.1.2.3",
        "169.254.169.254",
        "224.0.0.1",
        "239.1.1.1",
        "255.255.255.255",
    ],
)
def test_the_built_in_denials(host: str) -> None:
    verdict = DestinationPolicy().check(host, 80)
    assert not verdict.allowed
    assert verdict.rule.startswith("built-in denial of ") and "allow it with --allow-to" in verdict.rule


@pytest.mark.parametrize(
    "host", ["93.184.216.34", "10.0.0.1", "192.168.1.1", "128.0.0.1", "223.255.255.255", "169.255.0.1"]
)
def test_everything_else_is_allowed_by_default(host: str) -> None:
    assert allowed(DestinationPolicy(), host)


def test_rules_apply_in_order_and_the_first_match_decides() -> None:
    policy = DestinationPolicy(
        [
            parse_rule("127.0.0.1:8080", allow=True),
            parse_rule("10.0.0.0/8:22", allow=False),
            parse_rule("10.0.0.0/8", allow=True),
            parse_rule("0.0.0.0/0", allow=False),
        ]
    )
    assert allowed(policy, "127.0.0.1", 8080)
    assert not allowed(policy, "127.0.0.1", 8081)  # a deny-all rule matches before the built-ins
    assert policy.check("10.2.3.4", 22).rule == "--deny-to 10.0.0.0/8:22"
    assert allowed(policy, "10.2.3.4", 443)
    assert not allowed(policy, "93.184.216.34", 443)


def test_an_allow_rule_for_other_addresses_does_not_open_the_built_ins() -> None:
    policy = DestinationPolicy([parse_rule("10.0.0.0/8", allow=True)])
    assert not allowed(policy, "127.0.0.1")


def test_ports_lists_and_ranges() -> None:
    rule = parse_rule("192.0.2.0/24:25,465,8000-8999", allow=False)
    policy = DestinationPolicy([rule])
    assert [allowed(policy, "192.0.2.9", p) for p in (25, 26, 465, 7999, 8000, 8999, 9000)] == [
        False, True, False, True, False, False, True,
    ]  # fmt: skip
    assert allowed(policy, "192.0.3.9", 25)


def test_the_own_pipe_port_is_denied_on_own_addresses_whatever_the_rules() -> None:
    own = {"192.0.2.7", "127.0.0.1"}
    policy = DestinationPolicy([parse_rule("0.0.0.0/0", allow=True)], own_ports={6000}, is_own_address=own.__contains__)
    verdict = policy.check("192.0.2.7", 6000)
    assert not verdict.allowed and verdict.rule == "the RP's own pipe port 6000 (never allowed)"
    assert not allowed(policy, "127.0.0.1", 6000)
    assert allowed(policy, "192.0.2.8", 6000)  # another host's port 6000
    assert allowed(policy, "192.0.2.7", 6001)


@pytest.mark.parametrize(
    "text", ["", "localhost", "10.0.0.0/33", "010.0.0.0/8", "10.0.0.1:", "10.0.0.1:x", "10.0.0.1:5-3", "10.0.0.1:65536"]
)
def test_bad_rules(text: str) -> None:
    with pytest.raises(BadRule):
        parse_rule(text, allow=True)


def test_a_host_rule_is_one_address_and_a_network_rule_need_not_be_aligned() -> None:
    assert str(parse_rule("10.1.2.3", allow=True).network) == "10.1.2.3/32"
    assert str(parse_rule("10.1.2.3/8", allow=True).network) == "10.0.0.0/8"
    assert {r.text for r in BUILT_IN_DENIALS} == {
        "127.0.0.0/8", "0.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "255.255.255.255/32",
    }  # fmt: skip

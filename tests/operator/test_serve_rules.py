"""The operator's copy of tsnet2d's ``--serve`` grammar (tsnet2_operator.serve)."""

from __future__ import annotations

import pytest
from tsnet2_operator.serve import ServeRule, ServeRuleError, parse_serve_rule, parse_serve_rules


@pytest.mark.parametrize(("text", "port", "mode", "target", "canonical"), [
    ("80=127.0.0.1:8080", 80, "tcp", "127.0.0.1:8080", "80=127.0.0.1:8080"),
    ("80=tcp:127.0.0.1:8080", 80, "tcp", "127.0.0.1:8080", "80=127.0.0.1:8080"),
    ("80=http:127.0.0.1:8080", 80, "http", "127.0.0.1:8080", "80=http:127.0.0.1:8080"),
    ("443=http:localhost:8443", 443, "http", "localhost:8443", "443=http:localhost:8443"),
    ("22=[::1]:2222", 22, "tcp", "[::1]:2222", "22=[::1]:2222"),
    ("2222=proxy:unix:/tsnet2/ssh.sock", 2222, "proxy", "unix:/tsnet2/ssh.sock",
     "2222=proxy:unix:/tsnet2/ssh.sock"),
    ("8080=unix:/run/app.sock", 8080, "tcp", "unix:/run/app.sock", "8080=unix:/run/app.sock"),
    ("65535=127.0.0.1:1", 65535, "tcp", "127.0.0.1:1", "65535=127.0.0.1:1"),
    ("8000=http+proxy:127.0.0.1:8000", 8000, "http+proxy", "127.0.0.1:8000",
     "8000=http+proxy:127.0.0.1:8000"),
    ("81=127.0.0.2:80", 81, "tcp", "127.0.0.2:80", "81=127.0.0.2:80"),
    ("82=127.255.255.254:80", 82, "tcp", "127.255.255.254:80", "82=127.255.255.254:80"),
])
def test_good_rules(text: str, port: int, mode: str, target: str, canonical: str) -> None:
    rule = parse_serve_rule(text)
    assert (rule.port, rule.mode, rule.target) == (port, mode, target)
    assert str(rule) == canonical and parse_serve_rule(str(rule)) == rule


@pytest.mark.parametrize(("text", "needle"), [
    ("80", "no '='"),
    ("=127.0.0.1:80", "tailnet port ''"),
    ("0=127.0.0.1:80", "tailnet port '0'"),
    ("65536=127.0.0.1:80", "tailnet port '65536'"),
    ("080=127.0.0.1:80", "tailnet port '080'"),
    ("+80=127.0.0.1:80", "tailnet port '+80'"),
    ("80=10.0.0.1:80", "not a loopback literal"),
    ("80=0.0.0.0:80", "not a loopback literal"),
    ("80=web.default.svc:80", "not a loopback literal"),
    ("80=128.0.0.1:80", "not a loopback literal"),
    ("80=127.1:80", "not a loopback literal"),
    ("80=127.0.0.256:80", "not a loopback literal"),
    ("80=127.0.0.01:80", "not a loopback literal"),
    ("80=proxy+http:127.0.0.1:80", "not a loopback literal"),
    ("80=::1:80", "in brackets"),
    ("80=ftp:127.0.0.1:21", "unknown mode 'ftp'"),
    ("80=http:tcp:127.0.0.1:1", "one MODE at most"),
    ("80=127.0.0.1", "neither HOST:PORT nor unix:/PATH"),
    ("80=http:", "neither HOST:PORT nor unix:/PATH"),
    ("80=127.0.0.1:0", "target port '0'"),
    ("80=127.0.0.1:99999", "target port '99999'"),
    ("80=127.0.0.1:http", "target port 'http'"),
    ("80=unix:run/app.sock", "not absolute"),
    ("80=unix:/run/../etc/app.sock", "'..'"),
    ("80=unix:/run/", "is a directory"),
    ("80=unix:/" + "a" * 200, "longer than 107 bytes"),
])
def test_bad_rules_say_what_is_wrong(text: str, needle: str) -> None:
    with pytest.raises(ServeRuleError) as info:
        parse_serve_rule(text)
    assert needle in str(info.value) and repr(text) in str(info.value)


def test_rules_split_on_commas_and_whitespace() -> None:
    rules = parse_serve_rules(" 80=127.0.0.1:1,81=http:localhost:2 ,\n\t82=[::1]:3,, ")
    assert [r.port for r in rules] == [80, 81, 82]


def test_every_problem_is_reported_and_ports_are_unique() -> None:
    with pytest.raises(ServeRuleError) as info:
        parse_serve_rules("80=127.0.0.1:1 80=127.0.0.1:2 81=1.2.3.4:5")
    text = str(info.value)
    assert "tailnet port 80 is already served by '80=127.0.0.1:1'" in text
    assert "'81=1.2.3.4:5'" in text


@pytest.mark.parametrize("value", ["", " , \n"])
def test_no_rule_is_refused(value: str) -> None:
    with pytest.raises(ServeRuleError, match="no rule"):
        parse_serve_rules(value)


def test_check_refuses_well_formed_rules() -> None:
    def only_tcp(rule: ServeRule) -> str | None:
        return None if rule.mode == "tcp" else "tcp only"

    assert len(parse_serve_rules("80=127.0.0.1:1", only_tcp)) == 1
    with pytest.raises(ServeRuleError, match=r"'81=http:127\.0\.0\.1:1': tcp only"):
        parse_serve_rules("80=127.0.0.1:1 81=http:127.0.0.1:1", only_tcp)

import pytest

from lmc_connector.remote_url import RemoteUrlError, StoreAddress, parse_remote_url


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://localhost", StoreAddress((("localhost", 6379),))),
        ("redis://10.0.0.5:6380/2", StoreAddress((("10.0.0.5", 6380),), db=2)),
        ("valkey://host:7000", StoreAddress((("host", 7000),))),
        ("rediss://host:6380", StoreAddress((("host", 6380),), tls=True)),
        ("valkeys://host", StoreAddress((("host", 6379),), tls=True)),
        (
            "redis://:p%40ss@host:1",
            StoreAddress((("host", 1),), password="p@ss"),
        ),
        (
            "redis://alice:pw@host:1",
            StoreAddress((("host", 1),), username="alice", password="pw"),
        ),
        ("redis://[::1]:6379", StoreAddress((("::1", 6379),))),
        (
            "redis-cluster://a:7000,b:7001,c",
            StoreAddress((("a", 7000), ("b", 7001), ("c", 6379)), cluster=True),
        ),
        (
            "rediss-cluster://:pw@a:7000?ssl_ca_certs=/ca.pem&ssl_cert_reqs=none",
            StoreAddress(
                (("a", 7000),),
                cluster=True,
                tls=True,
                password="pw",
                tls_options=(("ssl_ca_certs", "/ca.pem"), ("ssl_cert_reqs", "none")),
            ),
        ),
    ],
)
def test_accepted_forms(url: str, expected: StoreAddress) -> None:
    assert parse_remote_url(url) == expected


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://host:6379", "unknown scheme 'http'"),
        ("localhost:6379", "unknown scheme"),
        ("redis://", "no host"),
        ("redis://host:port", "'port' is not a TCP port"),
        ("redis://host:70000", "not a TCP port"),
        ("redis://a:1,b:2", "several hosts need redis-cluster://"),
        ("redis://host/zero", "'zero' is not a db number"),
        ("redis-cluster://a:1/3", "Redis Cluster has only database 0"),
        ("redis://host?ssl_ca_certs=/x", "is a TLS option: use rediss://"),
        ("rediss://host?sslcerts=/x", "unknown option 'sslcerts'"),
        ("rediss://host?ssl_cert_reqs=maybe", "use one of required, optional, none"),
    ],
)
def test_mistakes_say_what_is_wrong_and_show_the_accepted_forms(url: str, message: str) -> None:
    with pytest.raises(RemoteUrlError, match="accepted forms") as error:
        parse_remote_url(url)
    assert message in str(error.value)


def test_passwords_never_show_in_errors_or_logs() -> None:
    with pytest.raises(RemoteUrlError) as error:
        parse_remote_url("redis://:hunter2@host:port")
    assert "hunter2" not in str(error.value)
    address = parse_remote_url("rediss://:hunter2@host:1")
    assert "hunter2" not in address.redacted() and "hunter2" not in repr(address)
    assert address.redacted() == "rediss://***@host:1"


@pytest.mark.parametrize("url", ["redis://:QX?ZJ@host:6379", "redis://:QX/ZJ@host:1"])
def test_a_password_with_an_unencoded_separator_never_shows_in_the_error(url: str) -> None:
    with pytest.raises(RemoteUrlError) as raised:
        parse_remote_url(url)
    message = str(raised.value)
    assert "QX" not in message and "ZJ" not in message
    assert "write ? / # @ as %3F %2F %23 %40" in message

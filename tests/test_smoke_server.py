"""The embedded default serves its demo people end to end."""

from qualify.clients import Client


def test_demo_server_serves_a_person(demo_server):
    with Client(demo_server.address) as client:
        record = client.get("user-42")
    assert record.key == "user-42"
    assert record.fields["user_id"] == "user-42"
    assert record.fields["plan"] in {"free", "starter", "pro", "enterprise"}
    assert record.memberships == []

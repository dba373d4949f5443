"""The `clients:` section of gateway.yaml: named clients, their keys, models and limits, and the
teams whose members share a spend budget."""

from __future__ import annotations

import re
from decimal import Decimal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

# Names appear in Redis keys, metric labels and URLs: keep them short and plain.
CLIENT_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
# GATEWAY_CLIENT_KEYS clients are `client-<n>`; requests without a key (when allowed) `anonymous`.
RESERVED_NAME = re.compile(r"^(client-\d+|anonymous|admin-\d+)$")
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ClientLimits(_Strict):
    """Per-client limits; null means unlimited. Quotas count images (n), budgets USD at the
    catalog's prices (app/tenants/budgets.py), both by UTC day and month."""

    requests_per_minute: int | None = Field(None, ge=0)
    images_per_minute: int | None = Field(None, ge=0)
    concurrent_requests: int | None = Field(None, ge=0)
    images_per_day: int | None = Field(None, ge=0)
    images_per_month: int | None = Field(None, ge=0)
    budget_usd_per_day: Decimal | None = Field(None, ge=0)
    budget_usd_per_month: Decimal | None = Field(None, ge=0)

    def over(self, defaults: ClientLimits) -> ClientLimits:
        """These limits where set (an explicit null included), the defaults elsewhere."""
        merged = defaults.model_dump()
        merged.update({name: getattr(self, name) for name in self.model_fields_set})
        return ClientLimits.model_validate(merged)

    def any_set(self) -> bool:
        return any(value is not None for value in self.model_dump().values())


class NamedClient(_Strict):
    # An environment variable holding this client's keys, comma-separated.
    keys_env: str | None = None
    # SHA-256 (hex) of keys handed out elsewhere: config can name a key without holding it.
    key_sha256: tuple[str, ...] = ()
    # Models this client may use; null: every model in the catalog.
    models: tuple[str, ...] | None = None
    limits: ClientLimits = ClientLimits()
    # Filled at load time from keys_env.
    keys: tuple[SecretStr, ...] = ()

    @field_validator("key_sha256")
    @classmethod
    def _hex_digests(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for digest in value:
            if not _SHA256_HEX.match(digest):
                raise ValueError("expected 64 lowercase hex characters (sha256 of the key)")
        return value


class Team(_Strict):
    """Clients that share a spend budget, on top of their own (a client is in one team at most)."""

    members: tuple[str, ...] = Field(min_length=1)
    budget_usd_per_day: Decimal | None = Field(None, ge=0)
    budget_usd_per_month: Decimal | None = Field(None, ge=0)

    def has_budget(self) -> bool:
        return self.budget_usd_per_day is not None or self.budget_usd_per_month is not None


class ClientsConfig(_Strict):
    # Redis key prefix for runtime keys, limits and usage; replicas sharing it share them.
    namespace: str = Field("igw", pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    # Limits for every client that does not set its own (GATEWAY_CLIENT_KEYS clients included).
    default_limits: ClientLimits = ClientLimits()
    named: dict[str, NamedClient] = Field(default_factory=dict)
    # Spend budgets shared by several clients (members: named clients or client-<n>).
    teams: dict[str, Team] = Field(default_factory=dict)

    @field_validator("named")
    @classmethod
    def _plain_names(cls, value: dict[str, NamedClient]) -> dict[str, NamedClient]:
        for name in value:
            _check_plain_name(name, "client")
            if RESERVED_NAME.match(name):
                raise ValueError(f"{name!r}: this name is reserved for built-in clients")
        return value

    @field_validator("teams")
    @classmethod
    def _plain_team_names(cls, value: dict[str, Team]) -> dict[str, Team]:
        for name in value:
            _check_plain_name(name, "team")
        return value

    def team_of(self, client: str) -> str | None:
        """The team `client` is a member of (settings check that there is at most one)."""
        for team, body in self.teams.items():
            if client in body.members:
                return team
        return None


def _check_plain_name(name: str, kind: str) -> None:
    if not CLIENT_NAME.match(name):
        raise ValueError(
            f"{name!r}: {kind} names are 1-63 of a-z 0-9 _ . - (starting with a letter or digit)"
        )

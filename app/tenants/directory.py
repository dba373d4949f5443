"""Who a presented key belongs to, and what that client may do (models and limits).

Clients come from three places: `GATEWAY_CLIENT_KEYS` (clients `client-1`, `client-2`...), the
`clients.named` section of gateway.yaml (keys from an environment variable or as SHA-256 digests),
and keys created at run time through the admin API (app/tenants/keystore.py). Only SHA-256
digests of keys are held. Configured digests are compared with `hmac.compare_digest` against
every entry; runtime keys are found by their digest, whose timing can tell an attacker nothing
about a key they do not already have.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from pydantic import SecretStr

from app.config.catalog import ModelRule
from app.config.tenants import ClientLimits, ClientsConfig
from app.errors import PermissionDenied
from app.tenants.keystore import RuntimeKeyStore

ANONYMOUS = "anonymous"


@dataclass(frozen=True, slots=True)
class ClientPolicy:
    name: str
    models: frozenset[str] | None  # None: every model
    limits: ClientLimits

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models

    def check_model(self, model: ModelRule) -> None:
        if not self.may_use(model.name):
            raise PermissionDenied(
                f"This API key may not use the model {model.name!r}; ask the gateway's operators "
                "for access, or use one of the models GET /v1/models lists for it.",
                param="model",
            )


def client_names(clients: ClientsConfig, env_key_count: int) -> list[str]:
    """Every client name there can be (metric labels rely on the list being bounded)."""
    env_clients = [f"client-{number}" for number in range(1, env_key_count + 1)]
    return [ANONYMOUS, *env_clients, *clients.named]


class ClientDirectory:
    def __init__(
        self,
        clients: ClientsConfig,
        *,
        env_keys: tuple[SecretStr, ...] = (),
        runtime_keys: RuntimeKeyStore | None = None,
    ) -> None:
        defaults = clients.default_limits
        self._policies: dict[str, ClientPolicy] = {
            ANONYMOUS: ClientPolicy(ANONYMOUS, None, defaults)
        }
        self._digests: list[tuple[str, bytes]] = []
        for number, key in enumerate(env_keys, start=1):
            name = f"client-{number}"
            self._policies[name] = ClientPolicy(name, None, defaults)
            self._digests.append((name, _digest(key.get_secret_value())))
        for name, client in clients.named.items():
            models = frozenset(client.models) if client.models is not None else None
            self._policies[name] = ClientPolicy(name, models, client.limits.over(defaults))
            self._digests += [(name, _digest(key.get_secret_value())) for key in client.keys]
            self._digests += [(name, bytes.fromhex(digest)) for digest in client.key_sha256]
        self._runtime = runtime_keys

    @property
    def has_configured_keys(self) -> bool:
        return bool(self._digests)

    @property
    def names(self) -> list[str]:
        """Every client name (bounded: all come from configuration)."""
        return list(self._policies)  # same order as client_names()

    def knows(self, name: str) -> bool:
        return name in self._policies and name != ANONYMOUS

    def policy(self, name: str) -> ClientPolicy:
        return self._policies.get(name) or self._policies[ANONYMOUS]

    async def identify(self, presented: str) -> str | None:
        """The client name for a presented key, or None for a key nobody holds."""
        digest = _digest(presented)
        found = None
        for name, expected in self._digests:
            # Compare against every key so timing does not tell which one matched.
            if hmac.compare_digest(digest, expected) and found is None:
                found = name
        if found is None and self._runtime is not None:
            owner = await self._runtime.lookup(digest.hex())
            # A key outlives a client removed from config; it then identifies nobody.
            found = owner if owner is not None and self.knows(owner) else None
        return found


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()

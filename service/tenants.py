"""Tenants: who a call is for, and what share of the replica and which limits it has.

A tenant is a bearer token with a name. The token file (--auth-token-file, or --auth-token)
holds one entry per line (or comma-separated bare tokens, as before tenants had names):

    s3cr3t-token                              # a bare token: its tenant is named t-<hash>
    search:Zm9vYmFy weight=2 max_queue=16      # name:token, then the tenant's policy
    search:bmV3LXRva2Vu                        # a second token for the same tenant (rotation)
    batch-jobs:cXV4 max_in_flight=4 tokens_per_minute=200000
    partner-x: weight=0.5                      # no token: a tenant named by its client
                                               # certificate (mutual TLS), its policy here

With mutual TLS and no bearer token, the client certificate's subject common name names the
tenant. Without authentication every call is the tenant `default`, and the server behaves as
it did before tenants. The token never leaves this module: logs, traces and metrics carry the
name, and only names the file knows appear as metric labels (any other is `other`).

Nothing here imports torch: the server process uses it, and the engine gets the policies.
"""
from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass, field

DEFAULT = "default"  # the tenant of every call when the server checks no token
OTHER = "other"  # the metric label of a tenant the file does not name (a certificate's CN)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class TenantPolicy:
    """A tenant's share and limits. 0 means no limit of its own: the queue limit is then the
    server's --max-queue, and in-flight requests and tokens are bounded by the server only."""

    name: str
    weight: float = 1.0  # its share of the replica against the other tenants'
    max_queue: int = 0  # requests waiting for a running slot (0: --max-queue)
    max_in_flight: int = 0  # requests accepted and not yet finished (0: no quota)
    tokens_per_minute: int = 0  # prompt + completion tokens over the last 60 s (0: no quota)
    known: bool = True  # named in the token file (its name may be a metric label)

    @property
    def label(self) -> str:
        return self.name if self.known else OTHER


_OPTIONS = ("weight", "max_queue", "max_in_flight", "tokens_per_minute")  # the file's keys


def bare_name(token: str) -> str:
    """The name of a tenant given by a bare token: a short hash, never the token."""
    return "t-" + hashlib.sha256(token.encode("latin-1")).hexdigest()[:10]


@dataclass
class Tenants:
    """The tenants a server knows: bearer tokens by value, policies by name."""

    tokens: list[tuple[bytes, str]] = field(default_factory=list)  # (token, tenant name)
    policies: dict[str, TenantPolicy] = field(default_factory=dict)

    @property
    def auth(self) -> bool:
        """Whether calls must carry a bearer token."""
        return bool(self.tokens)

    def match(self, token: bytes) -> str | None:
        """The tenant whose token this is, comparing against every token in constant time
        (so the time taken does not say which, or how much, matched)."""
        found = None
        for expected, name in self.tokens:
            if hmac.compare_digest(token, expected) and found is None:
                found = name
        return found

    def policy(self, name: str) -> TenantPolicy:
        """The named tenant's policy; one the file does not name (a certificate's common
        name) gets the defaults and the metric label `other`."""
        return self.policies.get(name) or TenantPolicy(name, known=False)

    def identify(self, authorization: str = "", common_name: str = "") -> TenantPolicy:
        """The tenant of a call that passed authentication: by its bearer token when the
        server checks tokens, else by its client certificate's common name (mutual TLS),
        else `default`."""
        if self.tokens:
            _, _, token = authorization.strip().partition(" ")
            name = self.match(token.strip().encode("latin-1", "replace"))
            if name is not None:
                return self.policy(name)
        if common_name:
            return self.policy(common_name)
        return self.policy(DEFAULT)

    def known(self) -> list[TenantPolicy]:
        return list(self.policies.values())


def parse(text: str, where: str = "the auth token") -> Tenants:
    """Tenants from the token file's text (see the module's docstring); errors name the line
    (never the token)."""
    out = Tenants()
    seen_tokens: set[bytes] = set()
    options_of: dict[str, dict[str, object]] = {}
    lines = [ln.split("#", 1)[0].strip() for ln in text.splitlines()]
    for number, line in enumerate(lines, 1):
        if not line:
            continue
        first, *rest = line.split()
        if ":" not in first and not rest:  # bare tokens, maybe several comma-separated
            for token in (t.strip() for t in first.split(",")):
                if token:
                    _add(out, seen_tokens, token, bare_name(token), {}, options_of, where,
                         number)
            continue
        name, sep, token = first.partition(":")
        if not sep:
            raise ValueError(f"{where}, line {number}: options need a tenant name: write "
                             f"name:token key=value ...")
        if not _NAME.match(name):
            raise ValueError(f"{where}, line {number}: tenant name {name!r} must be 1-64 "
                             f"letters, digits, '.', '_' or '-', starting with a letter or "
                             f"digit")
        options = {}
        for item in rest:
            key, eq, value = item.partition("=")
            if not eq or key not in _OPTIONS:
                raise ValueError(f"{where}, line {number}: unknown tenant option {item!r}; "
                                 f"use {', '.join(k + '=' for k in _OPTIONS)}")
            kind = float if key == "weight" else int
            try:
                options[key] = kind(value)
            except ValueError:
                raise ValueError(f"{where}, line {number}: {key}={value!r} is not "
                                 f"{'a number' if kind is float else 'an integer'}") from None
            if options[key] < 0 or (key == "weight" and options[key] <= 0):
                raise ValueError(f"{where}, line {number}: {key} must be "
                                 f"{'above 0' if key == 'weight' else '0 or more'}")
        _add(out, seen_tokens, token, name, options, options_of, where, number)
    return out


def _add(out: Tenants, seen: set[bytes], token: str, name: str, options: dict,
         options_of: dict[str, dict[str, object]], where: str, number: int) -> None:
    if token:
        raw = token.encode("latin-1", "replace")
        if raw in seen:
            raise ValueError(f"{where}, line {number}: a token appears twice")
        seen.add(raw)
        out.tokens.append((raw, name))
    if options:
        earlier = options_of.get(name)
        if earlier is not None and earlier != options:
            raise ValueError(f"{where}, line {number}: tenant {name!r} is given two different "
                             f"policies")
        options_of[name] = options
    out.policies[name] = TenantPolicy(name, **options_of.get(name, {}))


def from_settings(auth_token: str, client_ca: bool) -> Tenants:
    """The server's tenants: from the token(s) when given; else, with mutual TLS, named by
    certificates; else the one tenant `default`."""
    tenants = parse(auth_token) if auth_token.strip() else Tenants()
    if not tenants.policies:
        tenants.policies[DEFAULT] = TenantPolicy(DEFAULT)
    elif not tenants.auth and not client_ca:
        raise ValueError("the token file names tenants' policies but no token: give each "
                         "tenant a token (name:token), or turn on mutual TLS "
                         "(--tls-client-ca) so certificates name them")
    return tenants


def engine_shares(tenants: Tenants) -> tuple[tuple[str, float, int], ...]:
    """What the engine needs of the tenants: (name, weight, max_queue) of each named one."""
    return tuple((t.name, t.weight, t.max_queue) for t in tenants.known())

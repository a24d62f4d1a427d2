"""The per-VM HA record kept in etcd, as plain data, and its transitions.

One record per VM (key :func:`record_key`) says who is the **active**, in which
**term**, whether a **standby** has published its incoming address and whether the
active is **protected by** it.  Every change is one compare-and-swap transaction
(:mod:`kemari.ha.arbiter`); the functions here decide what a change may be, purely:
each takes the record as read (or ``None`` when there is none) and returns either a
:class:`Step` (the new record, plus the agent whose liveness key must be absent for the
step to commit) or a :class:`Refusal` with the reason.  The rules and why they keep at
most one active are in docs/ha.md.

The record is encoded as compact JSON with a format name and a version, and is parsed
and validated once, in :func:`decode_record`: anything else stored under the key (a
foreign value, another version, a record of another VM, a value that is too big or
breaks an invariant) is refused with one :class:`~kemari.ha.ArbiterError` line.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace

from kemari.ha import ArbiterError

FORMAT = "kemari-ha-record"
VERSION = 1
MAX_RECORD_BYTES = 2048
MAX_TERM = 2**63 - 1
KEY_ROOT = "kemari/ha"

_VM_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
# An agent identity is unique per agent *process* (e.g. "hostname:boot-nonce"), so an
# agent that restarted is never mistaken for the one the record names.  No "/": it is
# part of an etcd key.
_AGENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")
_ADDRESS = re.compile(r"[\x21-\x7e]{1,256}")
_FIELDS = frozenset({"format", "version", "vm", "term", "active", "protected_by", "standby"})
_STANDBY_FIELDS = frozenset({"agent", "address"})


def check_vm_name(vm: str) -> str:
    """``vm`` if it is a valid VM name for the arbiter's keys, else ArbiterError."""
    if not isinstance(vm, str) or not _VM_NAME.fullmatch(vm):
        raise ArbiterError(f"invalid VM name {vm!r}: 1-63 of [a-z0-9-], starting with [a-z0-9]")
    return vm


def check_agent(agent: str) -> str:
    """``agent`` if it is a valid agent identity, else ArbiterError."""
    if not isinstance(agent, str) or not _AGENT.fullmatch(agent):
        raise ArbiterError(
            f"invalid agent identity {agent!r}: 1-128 of [A-Za-z0-9._:@-], "
            "starting with a letter or digit"
        )
    return agent


def check_address(address: str) -> str:
    """``address`` if it is a plausible published address (printable, no spaces)."""
    if not isinstance(address, str) or not _ADDRESS.fullmatch(address):
        raise ArbiterError(f"invalid standby address {address!r}: 1-256 printable characters")
    return address


def record_key(vm: str) -> bytes:
    """The etcd key of ``vm``'s record (not bound to any lease: the term must survive)."""
    return f"{KEY_ROOT}/{check_vm_name(vm)}/record".encode()


def alive_key(vm: str, agent: str) -> bytes:
    """The etcd key that exists while ``agent``'s lease is alive (bound to that lease)."""
    return f"{KEY_ROOT}/{check_vm_name(vm)}/alive/{check_agent(agent)}".encode()


@dataclass(frozen=True)
class Standby:
    """A standby that published where the active can reach it."""

    agent: str
    address: str

    def __post_init__(self) -> None:
        check_agent(self.agent)
        check_address(self.address)


@dataclass(frozen=True)
class Record:
    """The VM's record: the active, its term, the published standby, the protection."""

    vm: str
    term: int
    active: str
    protected_by: str | None = None
    standby: Standby | None = None

    def __post_init__(self) -> None:
        check_vm_name(self.vm)
        if type(self.term) is not int or not 1 <= self.term <= MAX_TERM:
            raise ArbiterError(f"invalid term {self.term!r}: an integer from 1 to 2**63-1")
        check_agent(self.active)
        if self.standby is not None and self.standby.agent == self.active:
            raise ArbiterError(f"record names {self.active} both active and standby")
        if self.protected_by is not None:
            check_agent(self.protected_by)
            if self.standby is None or self.standby.agent != self.protected_by:
                raise ArbiterError(
                    f"record says protected by {self.protected_by} but that agent "
                    "has not published a standby address"
                )

    @property
    def protected(self) -> bool:
        return self.protected_by is not None

    def describe(self) -> str:
        """One line for logs and ``info status``."""
        if self.protected_by is not None:
            protection = f"protected by {self.protected_by}"
        elif self.standby is not None:
            protection = f"unprotected, standby {self.standby.agent} at {self.standby.address}"
        else:
            protection = "unprotected, no standby"
        return f"{self.vm}: term {self.term}, active {self.active}, {protection}"


def encode_record(record: Record) -> bytes:
    """The record's stored form: compact JSON, keys sorted."""
    standby = (
        None
        if record.standby is None
        else {"agent": record.standby.agent, "address": record.standby.address}
    )
    document = {
        "format": FORMAT,
        "version": VERSION,
        "vm": record.vm,
        "term": record.term,
        "active": record.active,
        "protected_by": record.protected_by,
        "standby": standby,
    }
    data = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    if len(data) > MAX_RECORD_BYTES:  # cannot happen with the field limits above
        raise ArbiterError(f"record of {record.vm} encodes to {len(data)} bytes")
    return data


def decode_record(data: bytes, vm: str) -> Record:
    """The record of ``vm`` stored as ``data``, validated; ArbiterError otherwise."""
    where = f"HA record of {vm}"
    if len(data) > MAX_RECORD_BYTES:
        raise ArbiterError(f"{where}: {len(data)} bytes, more than {MAX_RECORD_BYTES}")
    try:
        document = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArbiterError(f"{where}: not a Kemari record (not JSON: {exc})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ArbiterError(f"{where}: not a Kemari record (no format {FORMAT!r})")
    version = document.get("version")
    if version != VERSION or type(version) is not int:
        raise ArbiterError(f"{where}: record version {version!r}, this Kemari reads {VERSION}")
    if set(document) != _FIELDS:
        missing = sorted(_FIELDS - set(document))
        extra = sorted(set(document) - _FIELDS)
        raise ArbiterError(f"{where}: fields missing {missing}, unknown {extra}")
    if document["vm"] != vm:
        raise ArbiterError(f"{where}: the record names VM {document['vm']!r}")
    for field in ("active", "vm"):
        if not isinstance(document[field], str):
            raise ArbiterError(f"{where}: {field} must be a string")
    if document["protected_by"] is not None and not isinstance(document["protected_by"], str):
        raise ArbiterError(f"{where}: protected_by must be a string or null")
    raw_standby = document["standby"]
    standby = None
    if raw_standby is not None:
        if not isinstance(raw_standby, dict) or set(raw_standby) != _STANDBY_FIELDS:
            raise ArbiterError(f"{where}: standby must be null or {{agent, address}}")
        if not all(isinstance(raw_standby[f], str) for f in _STANDBY_FIELDS):
            raise ArbiterError(f"{where}: standby agent and address must be strings")
    try:
        if raw_standby is not None:
            standby = Standby(raw_standby["agent"], raw_standby["address"])
        return Record(
            vm=document["vm"],
            term=document["term"],
            active=document["active"],
            protected_by=document["protected_by"],
            standby=standby,
        )
    except ArbiterError as exc:
        raise ArbiterError(f"{where}: {exc}") from None


# --- transitions: each one compare-and-swap step -----------------------------------


@dataclass(frozen=True)
class Step:
    """A change to commit: ``record`` replaces the one read, in one transaction.

    ``requires_gone`` names an agent whose alive key must be absent in the same
    transaction (its lease has ended), for a claim over a record that names it.
    """

    record: Record
    requires_gone: str | None = None


@dataclass(frozen=True)
class Refusal:
    """Why a transition does not apply to the record as read."""

    reason: str


Decision = Step | Refusal


def claim(current: Record | None, vm: str, me: str, *, active_alive: bool) -> Decision:
    """Become the active: no record yet (term 1), or the record names an active whose
    lease has ended and who is unprotected (term + 1, the transaction also requires its
    alive key to be absent).  A protected record is never claimed: its active may still
    run while its standby commits, and only that standby may take over."""
    check_vm_name(vm)
    check_agent(me)
    if current is None:
        return Step(Record(vm=vm, term=1, active=me))
    if current.active == me:
        return Refusal(f"{me} is already the active in term {current.term}")
    if current.protected_by is not None:
        return Refusal(
            f"{current.active} is active in term {current.term} and protected by "
            f"{current.protected_by}: only that standby may take over"
        )
    if active_alive:
        return Refusal(f"{current.active} is active in term {current.term} and its lease is alive")
    return Step(Record(vm=vm, term=current.term + 1, active=me), requires_gone=current.active)


def publish_standby(current: Record | None, me: str, address: str) -> Decision:
    """Offer to be the standby of the current active at ``address`` (or move it)."""
    check_agent(me)
    check_address(address)
    if current is None:
        return Refusal("no active: there is nothing to protect (claim instead)")
    if current.active == me:
        return Refusal(f"{me} is the active in term {current.term}, not a standby")
    if current.protected_by is not None:
        return Refusal(f"{current.active} is already protected by {current.protected_by}")
    if current.standby is not None and current.standby.agent != me:
        return Refusal(
            f"{current.standby.agent} already published a standby address for {current.active}"
        )
    return Step(replace(current, standby=Standby(me, address)))


def mark_protected(current: Record | None, me: str, standby: Standby) -> Decision:
    """The active ``me`` protects to ``standby`` (its initial sync is committed)."""
    check_agent(me)
    if current is None or current.active != me:
        who = "nobody" if current is None else current.active
        return Refusal(f"{me} is not the active ({who} is)")
    if current.standby != standby:
        return Refusal(
            f"{standby.agent} at {standby.address} is not the published standby "
            f"({'none' if current.standby is None else current.standby.agent})"
        )
    if current.protected_by is not None:
        return Refusal(f"already protected by {current.protected_by}")
    return Step(replace(current, protected_by=standby.agent))


def drop_standby(current: Record | None, me: str) -> Decision:
    """The active ``me`` goes on alone: "A active, protected by S → A unprotected"
    (also forgets a published standby it never protected to)."""
    check_agent(me)
    if current is None or current.active != me:
        who = "nobody" if current is None else current.active
        return Refusal(f"{me} is not the active ({who} is)")
    if current.standby is None:
        return Refusal("no standby to drop")
    return Step(replace(current, protected_by=None, standby=None))


def take_over(current: Record | None, me: str) -> Decision:
    """The standby ``me`` becomes the active: "A active, protected by S → S active,
    term + 1" (only the standby that protects the active may)."""
    check_agent(me)
    if current is None:
        return Refusal("no record: there is no active to take over from")
    if current.protected_by != me:
        state = (
            f"protected by {current.protected_by}"
            if current.protected_by is not None
            else "unprotected"
        )
        return Refusal(f"{current.active} is active in term {current.term}, {state}, not by {me}")
    return Step(Record(vm=current.vm, term=current.term + 1, active=me))


def reattach(current: Record | None, me: str) -> Decision:
    """Change nothing but bind ``me``'s alive key to its current lease again (after its
    lease was lost and granted anew); only while the record still names ``me``."""
    check_agent(me)
    if current is None:
        return Refusal("no record")
    standby = None if current.standby is None else current.standby.agent
    if me not in (current.active, standby):
        return Refusal(f"the record names neither active nor standby {me}")
    return Step(current)

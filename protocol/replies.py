"""Words for the handshake's refusals: AUTH_BAD_METHOD and IDENT_MISSING_FEATURES.

Both directions: what our server sends when it refuses a client (with the methods and
modes it really allows, so a Ceph client's error is right too), and the error text our
client raises when a server refuses it, written for the person who has to fix it.
"""

from __future__ import annotations

from .auth import ServerAuth
from .ceph import features as ceph_feat
from .control import AUTH_CEPHX, AUTH_METHOD_NAMES, MODE_NAMES, AuthBadMethod

__all__ = ["EACCES", "EBUSY", "EOPNOTSUPP", "auth_bad_method_text", "missing_features_text",
           "server_bad_method"]

EBUSY = -16       # server at its connection limit ("kick the client")
EACCES = -13      # credentials refused
EOPNOTSUPP = -95  # what a mon answers for a method it does not allow
_ERRNO = {EBUSY: "EBUSY", EACCES: "EACCES", EOPNOTSUPP: "EOPNOTSUPP"}


def server_bad_method(auth: ServerAuth, busy: bool, method: int) -> AuthBadMethod:
    if busy:
        return AuthBadMethod(method, EBUSY, (), ())
    return AuthBadMethod(method, EACCES, auth.methods, auth.modes)


def _names(values: tuple[int, ...], table: dict[int, str]) -> str:
    return ", ".join(table.get(v, f"#{v}") for v in values) or "none listed"


def auth_bad_method_text(bad: AuthBadMethod) -> str:
    if bad.result == EBUSY:
        return ("server refused the connection: it is at its connection limit (EBUSY); "
                "retry later or scale the pool up")
    methods = _names(bad.allowed_methods, AUTH_METHOD_NAMES)
    modes = _names(bad.allowed_modes, MODE_NAMES)
    asked = AUTH_METHOD_NAMES.get(bad.method, f"#{bad.method}")
    errno = _ERRNO.get(bad.result, str(bad.result))
    text = (f"server rejected auth method {asked} ({errno}); it allows methods [{methods}] "
            f"with connection modes [{modes}]")
    if bad.allowed_methods and set(bad.allowed_methods) <= {AUTH_CEPHX}:
        return (text + ": it requires cephx, which asyncmsgr does not implement yet; "
                "set auth_cluster_required, auth_service_required and auth_client_required "
                "to none on the cluster, or use a Ceph client")
    return text + ": configure a matching --auth on this side"


def missing_features_text(missing: int) -> str:
    return (f"server requires Ceph feature bits {missing:#x} ({ceph_feat.describe(missing)}) "
            "that this client did not advertise in CLIENT_IDENT; advertise them "
            "(Config.ceph_features_supported) or connect to an older server")

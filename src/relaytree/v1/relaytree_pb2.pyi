from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STATUS_UNSPECIFIED: _ClassVar[Status]
    PASS: _ClassVar[Status]
    FAILED: _ClassVar[Status]
    TIMEOUT: _ClassVar[Status]
    UNREACHABLE: _ClassVar[Status]
STATUS_UNSPECIFIED: Status
PASS: Status
FAILED: Status
TIMEOUT: Status
UNREACHABLE: Status

class RawFrame(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class Target(_message.Message):
    __slots__ = ("name", "address")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ...) -> None: ...

class Envelope(_message.Message):
    __slots__ = ("protocol_version", "controller_version", "request_id", "not_after_ms", "nonce", "scope", "exec", "copy", "ping", "fetch")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CONTROLLER_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NOT_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    EXEC_FIELD_NUMBER: _ClassVar[int]
    COPY_FIELD_NUMBER: _ClassVar[int]
    PING_FIELD_NUMBER: _ClassVar[int]
    FETCH_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    controller_version: str
    request_id: str
    not_after_ms: int
    nonce: bytes
    scope: str
    exec: ExecSpec
    copy: CopySpec
    ping: PingSpec
    fetch: FetchSpec
    def __init__(self, protocol_version: _Optional[int] = ..., controller_version: _Optional[str] = ..., request_id: _Optional[str] = ..., not_after_ms: _Optional[int] = ..., nonce: _Optional[bytes] = ..., scope: _Optional[str] = ..., exec: _Optional[_Union[ExecSpec, _Mapping]] = ..., copy: _Optional[_Union[CopySpec, _Mapping]] = ..., ping: _Optional[_Union[PingSpec, _Mapping]] = ..., fetch: _Optional[_Union[FetchSpec, _Mapping]] = ...) -> None: ...

class Argv(_message.Message):
    __slots__ = ("args",)
    ARGS_FIELD_NUMBER: _ClassVar[int]
    args: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, args: _Optional[_Iterable[str]] = ...) -> None: ...

class ExecSpec(_message.Message):
    __slots__ = ("shell", "argv", "env", "cwd", "user", "stdin", "timeout_ms", "output_limit", "stdin_sha256")
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class StdinSha256Entry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    SHELL_FIELD_NUMBER: _ClassVar[int]
    ARGV_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    CWD_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    STDIN_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_LIMIT_FIELD_NUMBER: _ClassVar[int]
    STDIN_SHA256_FIELD_NUMBER: _ClassVar[int]
    shell: str
    argv: Argv
    env: _containers.ScalarMap[str, str]
    cwd: str
    user: str
    stdin: bytes
    timeout_ms: int
    output_limit: int
    stdin_sha256: _containers.ScalarMap[str, bytes]
    def __init__(self, shell: _Optional[str] = ..., argv: _Optional[_Union[Argv, _Mapping]] = ..., env: _Optional[_Mapping[str, str]] = ..., cwd: _Optional[str] = ..., user: _Optional[str] = ..., stdin: _Optional[bytes] = ..., timeout_ms: _Optional[int] = ..., output_limit: _Optional[int] = ..., stdin_sha256: _Optional[_Mapping[str, bytes]] = ...) -> None: ...

class StdinPatch(_message.Message):
    __slots__ = ("base", "prefix", "suffix", "middle")
    BASE_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    SUFFIX_FIELD_NUMBER: _ClassVar[int]
    MIDDLE_FIELD_NUMBER: _ClassVar[int]
    base: str
    prefix: int
    suffix: int
    middle: bytes
    def __init__(self, base: _Optional[str] = ..., prefix: _Optional[int] = ..., suffix: _Optional[int] = ..., middle: _Optional[bytes] = ...) -> None: ...

class CopySpec(_message.Message):
    __slots__ = ("dest", "size", "sha256", "chunk_size", "src_name", "mode", "owner", "group", "mkdirs", "backup", "check")
    DEST_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    SRC_NAME_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    MKDIRS_FIELD_NUMBER: _ClassVar[int]
    BACKUP_FIELD_NUMBER: _ClassVar[int]
    CHECK_FIELD_NUMBER: _ClassVar[int]
    dest: str
    size: int
    sha256: bytes
    chunk_size: int
    src_name: str
    mode: str
    owner: str
    group: str
    mkdirs: bool
    backup: bool
    check: bool
    def __init__(self, dest: _Optional[str] = ..., size: _Optional[int] = ..., sha256: _Optional[bytes] = ..., chunk_size: _Optional[int] = ..., src_name: _Optional[str] = ..., mode: _Optional[str] = ..., owner: _Optional[str] = ..., group: _Optional[str] = ..., mkdirs: bool = ..., backup: bool = ..., check: bool = ...) -> None: ...

class PingSpec(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FetchSpec(_message.Message):
    __slots__ = ("src", "src_by_node", "chunk_size")
    class SrcByNodeEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SRC_FIELD_NUMBER: _ClassVar[int]
    SRC_BY_NODE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    src: str
    src_by_node: _containers.ScalarMap[str, str]
    chunk_size: int
    def __init__(self, src: _Optional[str] = ..., src_by_node: _Optional[_Mapping[str, str]] = ..., chunk_size: _Optional[int] = ...) -> None: ...

class Authenticator(_message.Message):
    __slots__ = ("key_id", "signature")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    signature: bytes
    def __init__(self, key_id: _Optional[str] = ..., signature: _Optional[bytes] = ...) -> None: ...

class Route(_message.Message):
    __slots__ = ("targets", "width", "connect_timeout_ms", "batch_ms", "blobs", "stdin")
    class BlobsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    class StdinEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: StdinPatch
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[StdinPatch, _Mapping]] = ...) -> None: ...
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    CONNECT_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    BATCH_MS_FIELD_NUMBER: _ClassVar[int]
    BLOBS_FIELD_NUMBER: _ClassVar[int]
    STDIN_FIELD_NUMBER: _ClassVar[int]
    targets: _containers.RepeatedCompositeFieldContainer[Target]
    width: int
    connect_timeout_ms: int
    batch_ms: int
    blobs: _containers.ScalarMap[str, bytes]
    stdin: _containers.MessageMap[str, StdinPatch]
    def __init__(self, targets: _Optional[_Iterable[_Union[Target, _Mapping]]] = ..., width: _Optional[int] = ..., connect_timeout_ms: _Optional[int] = ..., batch_ms: _Optional[int] = ..., blobs: _Optional[_Mapping[str, bytes]] = ..., stdin: _Optional[_Mapping[str, StdinPatch]] = ...) -> None: ...

class Request(_message.Message):
    __slots__ = ("envelope", "auth", "route")
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    AUTH_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    envelope: bytes
    auth: Authenticator
    route: Route
    def __init__(self, envelope: _Optional[bytes] = ..., auth: _Optional[_Union[Authenticator, _Mapping]] = ..., route: _Optional[_Union[Route, _Mapping]] = ...) -> None: ...

class PingInfo(_message.Message):
    __slots__ = ("version", "protocol_version", "hostname", "uptime", "load")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    UPTIME_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    version: str
    protocol_version: int
    hostname: str
    uptime: float
    load: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, version: _Optional[str] = ..., protocol_version: _Optional[int] = ..., hostname: _Optional[str] = ..., uptime: _Optional[float] = ..., load: _Optional[_Iterable[float]] = ...) -> None: ...

class NodeResult(_message.Message):
    __slots__ = ("node", "status", "rc", "stdout", "stderr", "stdout_truncated", "stderr_truncated", "changed", "error", "elapsed", "ping", "dest", "via", "sha256", "size")
    NODE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    RC_FIELD_NUMBER: _ClassVar[int]
    STDOUT_FIELD_NUMBER: _ClassVar[int]
    STDERR_FIELD_NUMBER: _ClassVar[int]
    STDOUT_TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    STDERR_TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_FIELD_NUMBER: _ClassVar[int]
    PING_FIELD_NUMBER: _ClassVar[int]
    DEST_FIELD_NUMBER: _ClassVar[int]
    VIA_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    node: str
    status: Status
    rc: int
    stdout: bytes
    stderr: bytes
    stdout_truncated: bool
    stderr_truncated: bool
    changed: bool
    error: str
    elapsed: float
    ping: PingInfo
    dest: str
    via: str
    sha256: bytes
    size: int
    def __init__(self, node: _Optional[str] = ..., status: _Optional[_Union[Status, str]] = ..., rc: _Optional[int] = ..., stdout: _Optional[bytes] = ..., stderr: _Optional[bytes] = ..., stdout_truncated: bool = ..., stderr_truncated: bool = ..., changed: bool = ..., error: _Optional[str] = ..., elapsed: _Optional[float] = ..., ping: _Optional[_Union[PingInfo, _Mapping]] = ..., dest: _Optional[str] = ..., via: _Optional[str] = ..., sha256: _Optional[bytes] = ..., size: _Optional[int] = ...) -> None: ...

class ResultBatch(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[NodeResult]
    def __init__(self, results: _Optional[_Iterable[_Union[NodeResult, _Mapping]]] = ...) -> None: ...

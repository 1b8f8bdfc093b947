import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class IdlePolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IDLE_POLICY_NONE: _ClassVar[IdlePolicy]
    IDLE_POLICY_TIME: _ClassVar[IdlePolicy]
    IDLE_POLICY_TOKENS: _ClassVar[IdlePolicy]
IDLE_POLICY_NONE: IdlePolicy
IDLE_POLICY_TIME: IdlePolicy
IDLE_POLICY_TOKENS: IdlePolicy

class GetRequestEnergyRequest(_message.Message):
    __slots__ = ("request_id", "wait_final", "wait_timeout_ms", "idle_policy")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    WAIT_FINAL_FIELD_NUMBER: _ClassVar[int]
    WAIT_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    IDLE_POLICY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    wait_final: bool
    wait_timeout_ms: int
    idle_policy: IdlePolicy
    def __init__(self, request_id: _Optional[str] = ..., wait_final: _Optional[bool] = ..., wait_timeout_ms: _Optional[int] = ..., idle_policy: _Optional[_Union[IdlePolicy, str]] = ...) -> None: ...

class RequestEnergy(_message.Message):
    __slots__ = ("request_id", "tenant", "model_id", "backend", "traffic_class", "status", "correlation_id", "api", "prompt_tokens", "generated_tokens", "prompt_tokens_estimated", "received", "released", "first_token", "done", "queued_ms", "prefill_j", "decode_j", "idle_j", "total_j", "idle_policy", "co2e_g", "idle_policy_asked", "final")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_CLASS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CORRELATION_ID_FIELD_NUMBER: _ClassVar[int]
    API_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_ESTIMATED_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    QUEUED_MS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_J_FIELD_NUMBER: _ClassVar[int]
    DECODE_J_FIELD_NUMBER: _ClassVar[int]
    IDLE_J_FIELD_NUMBER: _ClassVar[int]
    TOTAL_J_FIELD_NUMBER: _ClassVar[int]
    IDLE_POLICY_FIELD_NUMBER: _ClassVar[int]
    CO2E_G_FIELD_NUMBER: _ClassVar[int]
    IDLE_POLICY_ASKED_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    tenant: str
    model_id: str
    backend: str
    traffic_class: str
    status: str
    correlation_id: str
    api: str
    prompt_tokens: int
    generated_tokens: int
    prompt_tokens_estimated: bool
    received: _timestamp_pb2.Timestamp
    released: _timestamp_pb2.Timestamp
    first_token: _timestamp_pb2.Timestamp
    done: _timestamp_pb2.Timestamp
    queued_ms: float
    prefill_j: float
    decode_j: float
    idle_j: float
    total_j: float
    idle_policy: IdlePolicy
    co2e_g: float
    idle_policy_asked: bool
    final: bool
    def __init__(self, request_id: _Optional[str] = ..., tenant: _Optional[str] = ..., model_id: _Optional[str] = ..., backend: _Optional[str] = ..., traffic_class: _Optional[str] = ..., status: _Optional[str] = ..., correlation_id: _Optional[str] = ..., api: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., generated_tokens: _Optional[int] = ..., prompt_tokens_estimated: _Optional[bool] = ..., received: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., released: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., first_token: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., done: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., queued_ms: _Optional[float] = ..., prefill_j: _Optional[float] = ..., decode_j: _Optional[float] = ..., idle_j: _Optional[float] = ..., total_j: _Optional[float] = ..., idle_policy: _Optional[_Union[IdlePolicy, str]] = ..., co2e_g: _Optional[float] = ..., idle_policy_asked: _Optional[bool] = ..., final: _Optional[bool] = ...) -> None: ...

class ListRequestsRequest(_message.Message):
    __slots__ = ("tenant", "model_id", "backend", "status", "start", "end", "page_size", "page_token", "idle_policy")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    IDLE_POLICY_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    model_id: str
    backend: str
    status: str
    start: _timestamp_pb2.Timestamp
    end: _timestamp_pb2.Timestamp
    page_size: int
    page_token: str
    idle_policy: IdlePolicy
    def __init__(self, tenant: _Optional[str] = ..., model_id: _Optional[str] = ..., backend: _Optional[str] = ..., status: _Optional[str] = ..., start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., idle_policy: _Optional[_Union[IdlePolicy, str]] = ...) -> None: ...

class ListRequestsResponse(_message.Message):
    __slots__ = ("requests", "next_page_token")
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[RequestEnergy]
    next_page_token: str
    def __init__(self, requests: _Optional[_Iterable[_Union[RequestEnergy, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetUsageRequest(_message.Message):
    __slots__ = ("start", "end", "group_by", "tenant", "idle_policy")
    class GroupBy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        TENANT: _ClassVar[GetUsageRequest.GroupBy]
        MODEL: _ClassVar[GetUsageRequest.GroupBy]
        BACKEND: _ClassVar[GetUsageRequest.GroupBy]
        HOUR: _ClassVar[GetUsageRequest.GroupBy]
        DAY: _ClassVar[GetUsageRequest.GroupBy]
    TENANT: GetUsageRequest.GroupBy
    MODEL: GetUsageRequest.GroupBy
    BACKEND: GetUsageRequest.GroupBy
    HOUR: GetUsageRequest.GroupBy
    DAY: GetUsageRequest.GroupBy
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    GROUP_BY_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    IDLE_POLICY_FIELD_NUMBER: _ClassVar[int]
    start: _timestamp_pb2.Timestamp
    end: _timestamp_pb2.Timestamp
    group_by: GetUsageRequest.GroupBy
    tenant: str
    idle_policy: IdlePolicy
    def __init__(self, start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., group_by: _Optional[_Union[GetUsageRequest.GroupBy, str]] = ..., tenant: _Optional[str] = ..., idle_policy: _Optional[_Union[IdlePolicy, str]] = ...) -> None: ...

class UsageRow(_message.Message):
    __slots__ = ("key", "requests", "prompt_tokens", "generated_tokens", "prefill_j", "decode_j", "idle_j", "total_j", "total_wh", "j_per_generated_token", "idle_share", "co2e_g", "provisional_requests", "estimated_prompt_requests")
    KEY_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_J_FIELD_NUMBER: _ClassVar[int]
    DECODE_J_FIELD_NUMBER: _ClassVar[int]
    IDLE_J_FIELD_NUMBER: _ClassVar[int]
    TOTAL_J_FIELD_NUMBER: _ClassVar[int]
    TOTAL_WH_FIELD_NUMBER: _ClassVar[int]
    J_PER_GENERATED_TOKEN_FIELD_NUMBER: _ClassVar[int]
    IDLE_SHARE_FIELD_NUMBER: _ClassVar[int]
    CO2E_G_FIELD_NUMBER: _ClassVar[int]
    PROVISIONAL_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_PROMPT_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    key: str
    requests: int
    prompt_tokens: int
    generated_tokens: int
    prefill_j: float
    decode_j: float
    idle_j: float
    total_j: float
    total_wh: float
    j_per_generated_token: float
    idle_share: float
    co2e_g: float
    provisional_requests: int
    estimated_prompt_requests: int
    def __init__(self, key: _Optional[str] = ..., requests: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., generated_tokens: _Optional[int] = ..., prefill_j: _Optional[float] = ..., decode_j: _Optional[float] = ..., idle_j: _Optional[float] = ..., total_j: _Optional[float] = ..., total_wh: _Optional[float] = ..., j_per_generated_token: _Optional[float] = ..., idle_share: _Optional[float] = ..., co2e_g: _Optional[float] = ..., provisional_requests: _Optional[int] = ..., estimated_prompt_requests: _Optional[int] = ...) -> None: ...

class BillingSettings(_message.Message):
    __slots__ = ("effective", "idle_policy", "grid_g_co2e_per_kwh", "pue", "source")
    EFFECTIVE_FIELD_NUMBER: _ClassVar[int]
    IDLE_POLICY_FIELD_NUMBER: _ClassVar[int]
    GRID_G_CO2E_PER_KWH_FIELD_NUMBER: _ClassVar[int]
    PUE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    effective: _timestamp_pb2.Timestamp
    idle_policy: IdlePolicy
    grid_g_co2e_per_kwh: float
    pue: float
    source: str
    def __init__(self, effective: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., idle_policy: _Optional[_Union[IdlePolicy, str]] = ..., grid_g_co2e_per_kwh: _Optional[float] = ..., pue: _Optional[float] = ..., source: _Optional[str] = ...) -> None: ...

class GetUsageResponse(_message.Message):
    __slots__ = ("rows", "total", "idle_policy", "grid_g_co2e_per_kwh", "pue", "start", "end", "settings", "settings_stored", "idle_policy_asked")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    IDLE_POLICY_FIELD_NUMBER: _ClassVar[int]
    GRID_G_CO2E_PER_KWH_FIELD_NUMBER: _ClassVar[int]
    PUE_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_STORED_FIELD_NUMBER: _ClassVar[int]
    IDLE_POLICY_ASKED_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedCompositeFieldContainer[UsageRow]
    total: UsageRow
    idle_policy: IdlePolicy
    grid_g_co2e_per_kwh: float
    pue: float
    start: _timestamp_pb2.Timestamp
    end: _timestamp_pb2.Timestamp
    settings: _containers.RepeatedCompositeFieldContainer[BillingSettings]
    settings_stored: bool
    idle_policy_asked: bool
    def __init__(self, rows: _Optional[_Iterable[_Union[UsageRow, _Mapping]]] = ..., total: _Optional[_Union[UsageRow, _Mapping]] = ..., idle_policy: _Optional[_Union[IdlePolicy, str]] = ..., grid_g_co2e_per_kwh: _Optional[float] = ..., pue: _Optional[float] = ..., start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., settings: _Optional[_Iterable[_Union[BillingSettings, _Mapping]]] = ..., settings_stored: _Optional[bool] = ..., idle_policy_asked: _Optional[bool] = ...) -> None: ...

class GetBackendEnergyRequest(_message.Message):
    __slots__ = ("start", "end")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    start: _timestamp_pb2.Timestamp
    end: _timestamp_pb2.Timestamp
    def __init__(self, start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class BackendEnergy(_message.Message):
    __slots__ = ("backend", "counter_j", "attributed_j", "prefill_j", "decode_j", "idle_j", "conservation_error_mj", "requests", "samples", "gaps", "attributed_until", "adjustment_mj", "adjusted_epochs")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    COUNTER_J_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTED_J_FIELD_NUMBER: _ClassVar[int]
    PREFILL_J_FIELD_NUMBER: _ClassVar[int]
    DECODE_J_FIELD_NUMBER: _ClassVar[int]
    IDLE_J_FIELD_NUMBER: _ClassVar[int]
    CONSERVATION_ERROR_MJ_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    GAPS_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTED_UNTIL_FIELD_NUMBER: _ClassVar[int]
    ADJUSTMENT_MJ_FIELD_NUMBER: _ClassVar[int]
    ADJUSTED_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    backend: str
    counter_j: float
    attributed_j: float
    prefill_j: float
    decode_j: float
    idle_j: float
    conservation_error_mj: int
    requests: int
    samples: int
    gaps: int
    attributed_until: _timestamp_pb2.Timestamp
    adjustment_mj: int
    adjusted_epochs: int
    def __init__(self, backend: _Optional[str] = ..., counter_j: _Optional[float] = ..., attributed_j: _Optional[float] = ..., prefill_j: _Optional[float] = ..., decode_j: _Optional[float] = ..., idle_j: _Optional[float] = ..., conservation_error_mj: _Optional[int] = ..., requests: _Optional[int] = ..., samples: _Optional[int] = ..., gaps: _Optional[int] = ..., attributed_until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., adjustment_mj: _Optional[int] = ..., adjusted_epochs: _Optional[int] = ...) -> None: ...

class GetBackendEnergyResponse(_message.Message):
    __slots__ = ("backends", "start", "end")
    BACKENDS_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    backends: _containers.RepeatedCompositeFieldContainer[BackendEnergy]
    start: _timestamp_pb2.Timestamp
    end: _timestamp_pb2.Timestamp
    def __init__(self, backends: _Optional[_Iterable[_Union[BackendEnergy, _Mapping]]] = ..., start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

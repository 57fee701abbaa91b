from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Modality(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODALITY_UNSPECIFIED: _ClassVar[Modality]
    IMAGE: _ClassVar[Modality]
    TEXT: _ClassVar[Modality]
    IMAGE_TEXT: _ClassVar[Modality]
MODALITY_UNSPECIFIED: Modality
IMAGE: Modality
TEXT: Modality
IMAGE_TEXT: Modality

class Query(_message.Message):
    __slots__ = ("text", "image")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    text: str
    image: bytes
    def __init__(self, text: _Optional[str] = ..., image: _Optional[bytes] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("query", "k", "beam_size", "target_modalities", "no_rerank")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    BEAM_SIZE_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODALITIES_FIELD_NUMBER: _ClassVar[int]
    NO_RERANK_FIELD_NUMBER: _ClassVar[int]
    query: Query
    k: int
    beam_size: int
    target_modalities: _containers.RepeatedScalarFieldContainer[Modality]
    no_rerank: bool
    def __init__(self, query: _Optional[_Union[Query, _Mapping]] = ..., k: _Optional[int] = ..., beam_size: _Optional[int] = ..., target_modalities: _Optional[_Iterable[_Union[Modality, str]]] = ..., no_rerank: _Optional[bool] = ...) -> None: ...

class Hit(_message.Message):
    __slots__ = ("key", "modality", "score", "id", "metadata", "item", "source")
    KEY_FIELD_NUMBER: _ClassVar[int]
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    ITEM_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    key: str
    modality: Modality
    score: float
    id: bytes
    metadata: str
    item: int
    source: str
    def __init__(self, key: _Optional[str] = ..., modality: _Optional[_Union[Modality, str]] = ..., score: _Optional[float] = ..., id: _Optional[bytes] = ..., metadata: _Optional[str] = ..., item: _Optional[int] = ..., source: _Optional[str] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("hits", "index_version", "partial", "missing_shards")
    HITS_FIELD_NUMBER: _ClassVar[int]
    INDEX_VERSION_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_FIELD_NUMBER: _ClassVar[int]
    MISSING_SHARDS_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[Hit]
    index_version: str
    partial: bool
    missing_shards: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, hits: _Optional[_Iterable[_Union[Hit, _Mapping]]] = ..., index_version: _Optional[str] = ..., partial: _Optional[bool] = ..., missing_shards: _Optional[_Iterable[str]] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("query", "items", "index_version")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    INDEX_VERSION_FIELD_NUMBER: _ClassVar[int]
    query: _containers.RepeatedScalarFieldContainer[float]
    items: _containers.RepeatedScalarFieldContainer[int]
    index_version: str
    def __init__(self, query: _Optional[_Iterable[float]] = ..., items: _Optional[_Iterable[int]] = ..., index_version: _Optional[str] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("items", "scores")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedScalarFieldContainer[int]
    scores: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, items: _Optional[_Iterable[int]] = ..., scores: _Optional[_Iterable[float]] = ...) -> None: ...

class Item(_message.Message):
    __slots__ = ("item", "key", "modality", "id", "source", "metadata")
    ITEM_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    item: int
    key: str
    modality: Modality
    id: bytes
    source: str
    metadata: str
    def __init__(self, item: _Optional[int] = ..., key: _Optional[str] = ..., modality: _Optional[_Union[Modality, str]] = ..., id: _Optional[bytes] = ..., source: _Optional[str] = ..., metadata: _Optional[str] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("items", "index_version")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    INDEX_VERSION_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedScalarFieldContainer[int]
    index_version: str
    def __init__(self, items: _Optional[_Iterable[int]] = ..., index_version: _Optional[str] = ...) -> None: ...

class FetchResponse(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[Item]
    def __init__(self, items: _Optional[_Iterable[_Union[Item, _Mapping]]] = ...) -> None: ...

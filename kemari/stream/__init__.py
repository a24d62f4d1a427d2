"""Codec for QEMU 7.2's x-colo migration stream: push parser, typed events, writers."""

from kemari.stream.events import (
    ColoEvent,
    Command,
    Configuration,
    DeviceState,
    Header,
    LiveStateEnd,
    RamBlock,
    RamBlockList,
    RamPageRun,
    SectionEnd,
    StreamEvent,
    VmDescription,
)
from kemari.stream.format import (
    ColoMessage,
    IncompleteStreamError,
    MalformedStreamError,
    UnsupportedStreamError,
)
from kemari.stream.parser import ParserState, StreamParser
from kemari.stream.writer import FailoverPage, encode_colo_message, failover_stream

__all__ = [
    "ColoEvent",
    "ColoMessage",
    "Command",
    "Configuration",
    "DeviceState",
    "FailoverPage",
    "Header",
    "IncompleteStreamError",
    "LiveStateEnd",
    "MalformedStreamError",
    "ParserState",
    "RamBlock",
    "RamBlockList",
    "RamPageRun",
    "SectionEnd",
    "StreamEvent",
    "StreamParser",
    "UnsupportedStreamError",
    "VmDescription",
    "encode_colo_message",
    "failover_stream",
]

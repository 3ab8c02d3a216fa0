"""The bus: topics, the CloudEvents envelope, codecs, publish/consume helpers, replay, the embedded broker."""

from .bus import Consumer, KafkaConfig, Publisher, ensure_topics, read_state, read_topic
from .codec import DecodeError, Envelope, decode, encode

__all__ = ["Consumer", "DecodeError", "Envelope", "KafkaConfig", "Publisher", "decode", "encode",
           "ensure_topics", "read_state", "read_topic"]

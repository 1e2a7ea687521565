"""The client wire protocol: pure codec (framing) and the message schema of each op."""

from meshq.protocol.codec import DEFAULT_MAX_FRAME, FrameDecoder, decode_frame, encode_frame

__all__ = ["DEFAULT_MAX_FRAME", "RETRY_DEDUP", "FrameDecoder", "decode_frame", "encode_frame"]

# The prefix of the dedup ids a client makes up so that its retries (through the same
# node) create no second message; a node may place such a message on a partition it
# dispatches itself (meshq.broker.partitions). Any other dedup id holds cluster-wide.
RETRY_DEDUP = "retry:"

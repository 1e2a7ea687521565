"""The client wire protocol: pure codec (framing) and the message schema of each op."""

from meshq.protocol.codec import DEFAULT_MAX_FRAME, FrameDecoder, decode_frame, encode_frame

__all__ = ["DEFAULT_MAX_FRAME", "FrameDecoder", "decode_frame", "encode_frame"]

"""Test helpers that ship with meshq: a real daemon as a subprocess, virtual time, a
simulated network (``simnet``) and cluster (``cluster``), and a history checker."""

from meshq.testing.clock import TrioClock
from meshq.testing.daemon import DaemonProcess
from meshq.testing.history import History, Report

__all__ = ["DaemonProcess", "History", "Report", "TrioClock"]

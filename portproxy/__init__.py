"""portproxy: a small, fast, Kubernetes-native L4 port forwarder."""

__version__ = "0.1.0"

"""The server's endpoints, one router per family, each over the shared `Service`."""

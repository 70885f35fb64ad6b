"""The web gateway: people in a browser chat with the live policy and label its answers, through
the same gRPC contracts as every other client (python -m web; see web/app.py)."""

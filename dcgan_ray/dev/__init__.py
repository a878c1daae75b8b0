"""The local development stack (cluster/local.sh): SeaweedFS and a Ray head on 127.0.0.1."""

"""SVHN: the official files, their validation, shards in the bucket, the fast reader; offline SVHN-format digits."""

"""cluster/iam/s3-policy.json allows every S3 request the code makes, and no more than the bucket and the prefix.

A real run goes through a recording proxy (tests/s3_proxy.py) in front of the SeaweedFS test server: the
driver's checks, two epochs on two Ray workers with scoring and checkpoint retention (Ray Train's own requests
through pyarrow included), the run page and `dcgan-ray runs`. Each recorded request is turned into the IAM
actions AWS's S3 API reference requires for it, and the policy, filled in for this bucket and prefix, must
allow each one. A new kind of request fails here until the policy (and this table) says what it needs.
"""

from __future__ import annotations

import fnmatch
import json

from dcgan_ray.cli import main as cli_main
from dcgan_ray.train.driver import train
from helpers import BUCKET, REPO, run_cfg
from s3_proxy import Request, S3Proxy

POLICY = REPO / "cluster" / "iam" / "s3-policy.json"
# Arrow's S3 filesystem asks for a bucket that cannot exist to learn which server it talks to (arrow
# cpp/src/arrow/filesystem/s3fs.cc, GetBackend): it expects the refusal.
ARROW_PROBE = "$extremelyunlikelytoexist$"


def policy_for(bucket: str, prefix: str) -> dict:
    """The policy as cluster/README.md has the user fill it in: their bucket, and their storage.prefix in place
    of the default dcgan-ray."""
    text = POLICY.read_text().replace("YOUR_BUCKET", bucket).replace(f"{bucket}/dcgan-ray/", f"{bucket}/{prefix}/")
    return json.loads(text)


def needs(r: Request) -> list[tuple[str, str]]:
    """(IAM action, resource ARN) pairs the request needs (AWS S3 API reference, each operation's permissions)."""
    bucket_arn, object_arn = f"arn:aws:s3:::{r.bucket}", f"arn:aws:s3:::{r.bucket}/{r.key}"
    q = r.query
    if not r.key:
        if r.method in ("HEAD", "GET") and not ({"uploads", "location", "versions"} & set(q)):
            return [("s3:ListBucket", bucket_arn)]  # HeadBucket, ListObjects(V2)
        if r.method == "POST" and "delete" in q:
            return [("s3:DeleteObject", f"{bucket_arn}/{key}") for key in r.deleted_keys]
    else:
        if r.method in ("GET", "HEAD") and "uploadId" not in q:
            return [("s3:GetObject", object_arn)]
        if r.method == "PUT" and r.copy_source:
            source = r.copy_source.lstrip("/").split("?")[0]
            return [("s3:PutObject", object_arn), ("s3:GetObject", f"arn:aws:s3:::{source}")]
        if r.method == "PUT" or (r.method == "POST" and ({"uploads", "uploadId"} & set(q))):
            return [("s3:PutObject", object_arn)]  # PutObject, UploadPart, Create/CompleteMultipartUpload
        if r.method == "DELETE":
            return [("s3:AbortMultipartUpload" if "uploadId" in q else "s3:DeleteObject", object_arn)]
    raise AssertionError(f"{r}: a request this test cannot map to IAM actions; add it here and to the policy")


def allowed(policy: dict, action: str, resource: str) -> bool:
    for statement in policy["Statement"]:
        actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        resources = statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]]
        assert statement["Effect"] == "Allow" and "Condition" not in statement
        if any(fnmatch.fnmatchcase(action, a) for a in actions) and any(
            fnmatch.fnmatchcase(resource, r) for r in resources
        ):
            return True
    return False


def test_the_policy_allows_every_request_of_a_run(ray_head, s3_server, data_prefix, tmp_path):
    proxy = S3Proxy(s3_server.ports.s3)
    try:
        cfg = run_cfg(proxy.endpoint, data_prefix, "policy-run", eval_every=1, epochs=2)
        cfg.data.max_images = 64
        cfg.checkpoint.keep = 1  # retention deletes the older checkpoint (Ray Train, through pyarrow)
        manifest = train(cfg)
        assert manifest["status"] == "finished"
        job = tmp_path / "job.yaml"
        job.write_text(cfg.to_yaml())
        assert cli_main(["runs", "--config", str(job)]) == 0
    finally:
        proxy.close()

    policy = policy_for(BUCKET, data_prefix)
    requests = [r for r in proxy.requests if r.bucket != ARROW_PROBE]
    kinds = {(r.method, bool(r.key), tuple(sorted(r.query))) for r in requests}
    # The run made the kinds of request the policy is about (a proxy that recorded nothing proves nothing).
    assert {("HEAD", False, ()), ("PUT", True, ()), ("GET", True, ()), ("POST", False, ("delete",))} <= kinds, kinds
    refused = sorted(
        {
            f"{r}: {action} on {resource}"
            for r in requests
            for action, resource in needs(r)
            if not allowed(policy, action, resource)
        }
    )
    assert not refused, "\n".join(refused)


def test_the_policy_is_scoped_to_the_bucket_and_prefix():
    policy = policy_for("a-bucket", "team/dcgan")
    assert allowed(policy, "s3:ListBucket", "arn:aws:s3:::a-bucket")
    assert allowed(policy, "s3:PutObject", "arn:aws:s3:::a-bucket/team/dcgan/runs/r/checkpoint.pt")
    for action, resource in [
        ("s3:ListBucket", "arn:aws:s3:::another-bucket"),
        ("s3:GetObject", "arn:aws:s3:::a-bucket/someone-else/data"),
        ("s3:PutObject", "arn:aws:s3:::a-bucket/team/dcgan"),  # the prefix itself is not under it
        ("s3:DeleteBucket", "arn:aws:s3:::a-bucket"),
        ("s3:PutBucketPolicy", "arn:aws:s3:::a-bucket"),
        ("s3:GetObject", "arn:aws:s3:::another-bucket/team/dcgan/x"),
    ]:
        assert not allowed(policy, action, resource), (action, resource)

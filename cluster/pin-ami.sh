#!/usr/bin/env bash
# Pin the AMI of cluster/aws-cluster.yaml: every node type's ImageId becomes AWS's public SSM parameter of the
# Deep Learning Base AMI (Ubuntu 24.04) at one version, so the head and every worker launched later start from
# the same image (same Python, same NVIDIA driver) however long the cluster lives.
#   bash cluster/pin-ami.sh          the parameter's current version in the file's provider.region
#   bash cluster/pin-ami.sh 42       a version of your choice (`aws ssm get-parameter-history --name PARAMETER`)
# To move the pin later, run it again (it says from which version to which, and which AMI that is), commit the
# file, and `ray up` again: new nodes start from the new AMI. Versions are per region: pin again after changing
# provider.region. Needs the AWS CLI with ssm:GetParameter(s), ssm:GetParameterHistory and ec2:DescribeImages.
#   CONFIG=FILE   another cluster config than cluster/aws-cluster.yaml
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
config="${CONFIG:-cluster/aws-cluster.yaml}"
parameter=/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-24.04/latest/ami-id
region="$(sed -n 's/^  region: *\([a-z0-9-]*\).*/\1/p' "$config" | head -n 1)"
[ -n "$region" ] || { echo "error: no provider.region in $config" >&2; exit 2; }
version="${1:-$(aws ssm get-parameter --region "$region" --name "$parameter" --query Parameter.Version --output text)}"
[[ "$version" =~ ^[0-9]+$ ]] || { echo "error: '$version' is not a parameter version (a number)" >&2; exit 2; }
ami="$(aws ssm get-parameter --region "$region" --name "$parameter:$version" --query Parameter.Value --output text)"
described="$(aws ec2 describe-images --region "$region" --image-ids "$ami" --query 'Images[0].[Name,CreationDate]' --output text)"
before="$(grep -o "resolve:ssm:$parameter:[A-Za-z0-9_.-]*" "$config" | head -n 1 | sed 's/.*://')"
sed -i -E "s#resolve:ssm:$parameter(:[A-Za-z0-9_.-]+)?#resolve:ssm:$parameter:$version#g" "$config"
echo "pinned $config to version $version of $parameter in $region (was: ${before:-unpinned}):"
echo "  $ami  $described"

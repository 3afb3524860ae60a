"""Typed models of the catalogued facts about the clouds ftplan's bundled backends launch on: the SageMaker
training images (catalogs/sagemaker_images.json) and the EC2 vCPU quota codes (catalogs/ec2_quotas.json).
Loaded once by ftplan.data.catalog; only the backends read them, so the estimate path never builds them."""

from __future__ import annotations

from pydantic import Field

from ftplan.data.rules import _Rules


def version_tuple(text: str) -> tuple[int, ...]:
    """'2.9.0' -> (2, 9, 0); a local build suffix ('2.4.1+cu121') is ignored."""
    return tuple(int(part) for part in text.split("+")[0].split(".") if part.isdigit())


class TrainingImage(_Rules):
    tag: str
    pytorch: str
    transformers: str
    python: str
    cuda: str = Field(pattern=r"^cu\d+$")
    os: str
    listed_by_aws: bool = Field(description="on AWS's available-images page when catalogued")
    blackwell: bool = Field(description="built for CUDA 12.8 or later (Blackwell GPUs need it)")
    source: str

    @property
    def cuda_number(self) -> int:
        return int(self.cuda.removeprefix("cu"))


class TrainingImages(_Rules):
    """catalogs/sagemaker_images.json: the Hugging Face PyTorch training DLCs, with registries per region."""

    schema_: int = Field(alias="schema")
    about: str
    source: str
    date: str
    date_note: str
    repository: str
    uri_template: str
    uri_template_source: str
    dns_suffix: dict[str, str]
    dns_suffix_source: str
    registries: dict[str, str]
    registries_source: str
    blackwell_min_cuda: int = Field(gt=0)
    blackwell_source: str
    images: list[TrainingImage] = Field(min_length=1)
    caveats: list[str]

    def uri(self, image: TrainingImage, region: str) -> str:
        """The image's URI in `region` (its registry account and DNS suffix)."""
        return self.uri_template.format(account=self.registries[region], region=region,
                                        dns_suffix=self.dns_suffix.get(region, self.dns_suffix["default"]),
                                        repository=self.repository, tag=image.tag)


class QuotaFamily(_Rules):
    name: str
    prefixes: list[str] = Field(min_length=1)
    on_demand: str = Field(pattern=r"^L-[0-9A-F]{8}$")
    spot: str = Field(pattern=r"^L-[0-9A-F]{8}$")
    quota_names: list[str]


class Ec2Quotas(_Rules):
    """catalogs/ec2_quotas.json: the vCPU quota codes per EC2 instance family."""

    schema_: int = Field(alias="schema")
    about: str
    source: str
    date: str
    families: list[QuotaFamily]

    def for_family(self, letters: str) -> QuotaFamily | None:
        """The quota family of an instance family's letters ('g', 'p', 'vt', 'm'), None when not catalogued."""
        return next((f for f in self.families if letters in f.prefixes), None)

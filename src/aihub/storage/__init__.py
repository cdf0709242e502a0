"""File storage every product shares: put, get and delete objects by key, and sign links to them.

`local` (the default) keeps files under `DATA_DIR/files`; `gcs` (Google Cloud Storage) and `s3`
(AWS S3 or a compatible store: MinIO, Cloudflare R2, ...) keep them in a bucket and sign their own
upload and download links. Keys are `/`-separated paths of safe segments, owner first
(`images/{user_id}/{job_id}/0.png`), so everything a user owns can be deleted by prefix.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aihub.core.config import Settings
    from aihub.storage.base import Storage


def create_storage(settings: Settings) -> Storage:
    """The configured backend (`STORAGE_BACKEND`), from settings already checked at start-up."""
    if settings.storage_backend == "gcs":
        from aihub.storage.gcs import GCSStorage

        if settings.gcs_bucket_name is None or settings.gcs_service_account is None:
            raise ValueError("STORAGE_BACKEND=gcs needs GCS_BUCKET_NAME and a service-account key")
        return GCSStorage(
            settings.gcs_bucket_name,
            settings.gcs_service_account,
            base_url=settings.gcs_base_url,
        )
    if settings.storage_backend == "s3":
        from aihub.storage.s3 import S3Credentials, S3Storage

        if not (settings.s3_bucket and settings.s3_access_key_id and settings.s3_secret_access_key):
            raise ValueError("STORAGE_BACKEND=s3 needs S3_BUCKET and S3 access keys")
        token = settings.s3_session_token
        return S3Storage(
            settings.s3_bucket,
            S3Credentials(
                access_key_id=settings.s3_access_key_id,
                secret_access_key=settings.s3_secret_access_key.get_secret_value(),
                session_token=token.get_secret_value() if token else None,
            ),
            region=settings.s3_region.strip(),
            endpoint_url=settings.s3_endpoint_url,
            path_style=settings.s3_force_path_style,
        )
    from aihub.storage.local import LocalStorage

    return LocalStorage(settings.data_dir / "files")

# A local_settings.py of the old dicom-pipeline, as a site filled it in from
# local_settings.sample.py (Python 2 era, Django 1.4 style). Test data for
# `anonpipe import-settings`: it is read, never imported or run.
import os

# This will be the AE (DICOM Application Entity) of the DICOM server started on
# this computer to receive the identified DICOM files from the staging PACS
LOCAL_AE = "DCMQR"
# The AE of your staging PACS
STAGE_AE = "DCM4CHEE"
# The AE of your production PACS
PROD_AE = "RESEARCH_PACS"
# IP address of this machine. Must be reachable from your staging PACS
LOCAL_HOST = "10.30.1.17"
# IP address or hostname of your staging PACS
STAGE_HOST = "pacs-staging.example.org"
# IP address or hostname of your production PACS
PROD_HOST =  "10.30.2.40"
# DICOM ports for your local receiving server, staging PACS, and production
# PACS. Should not have to change unless you use non-standard PACS setup
DEFAULT_PORT = 11112
STAGE_PORT = DEFAULT_PORT
PROD_PORT = 4242
LOCAL_PORT = DEFAULT_PORT
# DICOM root to be used when anonymizing DICOM files.
DICOM_ROOT = "1.2.826.0.1.3680043.2.1143"

POST_ANON_HOOK = 'default'

######### Django settings
INSTALLED_APPS = (os.path.split(os.path.split(__file__)[0])[1],)
SECRET_KEY = 'k#2m9v!q0x$p4r@z7w8e&t5y1u3i6o-plkjhgfdsa'

# Define your staging database parameters here
staging_database = {
    'ENGINE': 'django.db.backends.postgresql_psycopg2',
    'NAME': 'dicom_review',
    'USER': 'pipeline',
    'PASSWORD': 'Tr0ub4dor&3',
    'HOST': 'db.example.org',
    'PORT': '5432',
}

DATABASES = {
    'default': staging_database,
     # define your production database parameters here.
	 # this will only be used if you manually execute the copytoprod.py script
    'production': {
        'ENGINE': 'django.db.backends.postgresql_psycopg2',
        'NAME': 'research',
        'USER': 'pipeline',
        'PASSWORD': 'c0rrect-h0rse',
        'HOST': 'db.example.org',
        'PORT': '5432',
    },
    'staging': staging_database
}

DATABASE_ROUTERS = (
    'routers.ProductionDataRouter',
    'routers.StagingDataRouter',
)

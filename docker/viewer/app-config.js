/* OHIF Viewer configuration for mammo-node's compose file: the viewer talks to Orthanc's
 * DICOMweb plugin through the same origin (nginx proxies /dicom-web/ to Orthanc), so there is
 * no CORS and no Orthanc credential in the browser. */
window.config = {
  name: 'mammo-node',
  routerBasename: '/',
  extensions: [],
  modes: [],
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: true,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  // Loading the AI SR (double-click "AI calcification analysis") puts its findings straight into
  // the Measurements panel, without the "track measurements?" prompts.
  disableConfirmationPrompts: true,
  defaultDataSourceName: 'orthanc',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {
        friendlyName: 'Orthanc PACS (mammo-node)',
        name: 'orthanc',
        wadoUriRoot: window.location.origin + '/wado',
        qidoRoot: window.location.origin + '/dicom-web',
        wadoRoot: window.location.origin + '/dicom-web',
        // Orthanc's DICOMweb plugin refuses OHIF's comma-separated includefield list: without
        // this switch the study list shows "No Description".
        qidoSupportsIncludeField: false,
        supportsReject: false,
        dicomUploadEnabled: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        omitQuotationForMultipartRequest: true,
        bulkDataURI: { enabled: true },
      },
    },
  ],
};

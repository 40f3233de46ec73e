from geomstore.cli import main

main()
